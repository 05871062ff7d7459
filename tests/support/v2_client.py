"""The peer's and the tracker's ends of onion-http/2 circuits (§11, §12, §14) for the relay world.

``V2Client`` builds circuits through real ``NodeRelay``s of
``relay_network.Network`` with ``protocol.ntor`` as the client: CREATE
and EXTEND carry ntor handshakes, every layer is a counted ``HopKeys``
layer, messages at the exit are padded and framed, and the last hop can be
the tracker, sealed with its own handshake. ``SealedTracker`` is the fake
tracker with an onion key: it answers handshakes and opens its layer.
Written from the design alone, independently of the peer's own code.
"""

from __future__ import annotations

import orjson

from onion_twisted.protocol import cells, ntor, onion2, wire
from onion_twisted.protocol.onion2 import FRAME_OBJECT, FRAME_SEALED, frame, pad_message, parse_frame, unpad
from onion_twisted.protocol.onion_keys import OnionKeyRing
from tests.support.relay_network import TRACKER, TRACKER_KEY, FakeTracker, dumps

TRACKER_ID = ntor.member_id(TRACKER_KEY.public_key())


class SealedTracker(FakeTracker):
    """FakeTracker plus the sealed last hop: a string payload on an unknown (exit IP, CID)
    is a handshake, on a known one a layer holding a padded message."""

    def __init__(self, clock):
        super().__init__()
        self.ring = OnionKeyRing(clock)
        self.sealed: dict[tuple[str, str], onion2.HopKeys] = {}
        self.sealed_destroys: list[tuple[str, str, bytes]] = []

    def handle(self, source_ip, body):
        cell = cells.parse_cell(body)
        key = (source_ip, cell.cid)
        if cell.destroy:
            if cell.payload is not None:
                keys = self.sealed[key]
                self.sealed_destroys.append((source_ip, cell.cid, unpad(keys.open_forward(cells.payload_bytes(cell)))))
            self.sealed.pop(key, None)
            return super().handle(source_ip, body)
        if isinstance(cell.payload, dict):
            return super().handle(source_ip, body)
        data = cells.payload_bytes(cell)
        keys = self.sealed.get(key)
        if keys is None:
            keys, reply = ntor.server_reply(TRACKER_ID, self.ring.private_for, data)
            self.sealed[key] = keys
            return cells.encode_reply_layer(reply)
        message = orjson.loads(unpad(keys.open_forward(data)))
        answer = orjson.loads(super().handle(source_ip, cells.encode_cell(cell.cid, message)))
        if "payload" not in answer:
            return b"{}"
        return cells.encode_reply_layer(keys.seal_backward(pad_message(dumps(answer["payload"]))))

    def backward_cell(self, exit_ip, cid, message: dict) -> bytes:
        """A message the tracker starts on a sealed circuit (its request to a sharer)."""
        return cells.encode_cell(cid, self.sealed[(exit_ip, cid)].seal_backward(pad_message(dumps(message))))


class V2Circuit:
    def __init__(self, cid, hop):
        self.cid = cid
        self.hops = [hop]
        self.keys: list[onion2.HopKeys] = []
        self.tracker_keys: onion2.HopKeys | None = None
        self.tracker_cid: str | None = None

    @property
    def exit(self):
        return self.hops[-1]


class V2Client:
    """One peer (of ``relay_network.Network``) speaking /2."""

    def __init__(self, peer):
        self.peer = peer
        self.ip = peer.ip

    # --- layers -----------------------------------------------------------------------

    @staticmethod
    def wrap(circuit, plaintext: bytes) -> bytes:
        for keys in reversed(circuit.keys):
            plaintext = keys.seal_forward(plaintext)
        return plaintext

    @staticmethod
    def peel(circuit, data: bytes) -> bytes:
        for keys in circuit.keys:
            data = keys.open_backward(data)
        return data

    def open_reply(self, circuit, reply: bytes) -> bytes | None:
        payload = cells.parse_reply(reply)
        if payload is None:
            return None
        return self.peel(circuit, wire.b64decode(payload))

    def read_item(self, circuit, framed: bytes) -> dict:
        """An exit frame for the peer: an OBJECT, or the tracker's SEALED layer, opened."""
        kind, body = parse_frame(framed)
        if kind == FRAME_OBJECT:
            return orjson.loads(unpad(body))
        return orjson.loads(unpad(circuit.tracker_keys.open_backward(body)))

    def cell(self, circuit, plaintext: bytes) -> bytes:
        return cells.encode_cell(circuit.cid, self.wrap(circuit, plaintext))

    async def send(self, circuit, plaintext: bytes) -> bytes:
        return await circuit.hops[0].handle(self.ip, self.cell(circuit, plaintext))

    # --- building ---------------------------------------------------------------------

    @staticmethod
    def handshake(node):
        return ntor.client_start(node.member_id, node.onion_keys.current_public)

    async def create(self, node, handshake=None) -> V2Circuit:
        circuit = V2Circuit(wire.new_circuit_id(), node)
        state, data = handshake or self.handshake(node)
        reply = await node.handle(self.ip, cells.encode_cell(circuit.cid, data))
        circuit.keys.append(state.finish(wire.b64decode(cells.parse_reply(reply))))
        return circuit

    def extend_message(self, to, data: bytes) -> bytes:
        return pad_message(dumps({"to": str(to), "relay": wire.b64encode(data)}))

    async def extend(self, circuit, node) -> None:
        state, data = self.handshake(node)
        reply = await self.send(circuit, self.extend_message(node.own_address, data))
        circuit.keys.append(state.finish(self.open_reply(circuit, reply)))
        circuit.hops.append(node)

    async def seal(self, circuit, tracker: SealedTracker) -> None:
        """The last extend: the tracker's ntor handshake (§12)."""
        before = set(tracker.sealed)
        state, data = ntor.client_start(TRACKER_ID, tracker.ring.current_public)
        reply = await self.send(circuit, self.extend_message(TRACKER, data))
        circuit.tracker_keys = state.finish(self.open_reply(circuit, reply))
        (_, circuit.tracker_cid), = set(tracker.sealed) - before

    async def connect(self, circuit, first=None) -> dict:
        """The last extend of an unsealed circuit: the first message as the relay (a /1 object)."""
        first = first or {"type": "ls", "files": ["a"]}
        tracker = self.peer.network.tracker
        before = len(tracker.received)
        reply = await self.send(circuit, pad_message(dumps({"to": str(TRACKER), "relay": first})))
        circuit.tracker_cid = tracker.received[before][1]
        return orjson.loads(self.open_reply(circuit, reply))  # an extend's reply: not framed

    async def build(self, nodes, *, tracker: SealedTracker | None = None, connect=True) -> V2Circuit:
        circuit = await self.create(nodes[0])
        for node in nodes[1:]:
            await self.extend(circuit, node)
        if tracker is not None:
            await self.seal(circuit, tracker)
            if connect:
                await self.request(circuit, {"type": "ls", "files": ["a"]})
        elif connect:
            await self.connect(circuit)
        return circuit

    # --- messages ---------------------------------------------------------------------

    def message_frame(self, circuit, message: dict) -> bytes:
        body = dumps(message)
        if circuit.tracker_keys is not None and message.get("type") not in ("file_chunk", "transfer_end"):
            return frame(FRAME_SEALED, circuit.tracker_keys.seal_forward(pad_message(body)))
        chunk_size = message.get("chunk_size") if message.get("type") == "file_chunk" else None
        return frame(FRAME_OBJECT, pad_message(body, chunk_size=chunk_size))

    async def request(self, circuit, message: dict) -> dict | None:
        """A message at the exit (to the tracker, or over a bridge); the reply opened, or None."""
        data = self.open_reply(circuit, await self.send(circuit, self.message_frame(circuit, message)))
        return None if data is None else self.read_item(circuit, data)

    def backward(self, circuit) -> list[dict]:
        """The items received backward on ``circuit``, every layer peeled and the frame read."""
        return [self.read_item(circuit, self.peel(circuit, cells.payload_bytes(cell)))
                for _, cell in self.peer.received if cell.cid == circuit.cid and not cell.destroy]

    def destroy_cell(self, circuit) -> bytes:
        """A layered destroy (§14): the tracker's layer on a sealed circuit, else an OBJECT frame."""
        if circuit.tracker_keys is not None:
            inner = frame(FRAME_SEALED, circuit.tracker_keys.seal_forward(pad_message(onion2.DESTROY)))
        else:
            inner = frame(FRAME_OBJECT, pad_message(onion2.DESTROY))
        return cells.encode_destroy(circuit.cid, self.wrap(circuit, inner))

    async def destroy(self, circuit) -> bytes:
        return await circuit.hops[0].handle(self.ip, self.destroy_cell(circuit))
