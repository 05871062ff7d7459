"""What a node does differently on an onion-http/2 circuit (PROTOCOL.md §11, §12, §14).

``NodeRelay`` (relay.py) dispatches every cell; on a /2 circuit it calls
the methods here: the ntor CREATE, the exit frame both ways, the sealed
tracker hop and the layered destroy. A /2 circuit's record holds
``HopKeys`` (circuits.py); everything else (budgets, the table, bridges,
extends to nodes) is /1's, so the two versions share one relay.
"""

from __future__ import annotations

from onion_twisted.protocol import cells, messages, ntor, onion2, wire
from onion_twisted.protocol.cells import EMPTY, encode_reply_layer
from onion_twisted.protocol.errors import BadRequest, Forbidden, NextHopFailed, UnknownCircuit
from onion_twisted.node.circuits import NODE, RelayCircuit

V1_REFUSED = "this node accepts onion-http/2 circuits only"


def padded_frame(kind: int, body: bytes, chunk_size: int | None = None) -> bytearray:
    """``kind ‖ pad_message(body)`` built in one buffer: a chunk is copied once, not three times."""
    size = onion2.padded_size(len(body))
    if chunk_size is not None:
        size = max(size, onion2.chunk_class(chunk_size))
    framed = bytearray(1 + size)  # zeros: the padding is there already
    framed[0] = kind
    framed[1:5] = len(body).to_bytes(4, "big")
    framed[5:5 + len(body)] = body
    return framed


def chunk_size_of(obj) -> int | None:
    """The chunk size a bridged ``file_chunk`` is padded to (§13, §14); None for any other object.

    A transfer's chunks, its last short one included, are padded to its chunk
    class, so the requester's entry sees one length for all of them; its
    ``transfer_start`` and ``transfer_end`` are messages, padded by their
    length (docs, section 17.4: a class each would cost two chunks' worth per
    transfer and hide nothing the flow of chunks does not show). Only a size a
    transfer may have (16 KiB .. 4 MiB) counts: the object comes from a peer,
    and a made-up size must not make the exit allocate more.
    """
    if not isinstance(obj, dict) or obj.get("type") != messages.FILE_CHUNK:
        return None
    size = obj.get("chunk_size")
    if type(size) is int and messages.MIN_CHUNK <= size <= messages.MAX_CHUNK:
        return size
    return None


class OnionV2Relay:
    """The /2 half of ``NodeRelay`` (a mixin: it uses the relay's table, outbound, budgets)."""

    # --- create (§11) ---------------------------------------------------------------

    def _create_v2(self, source_ip: str, cid: str, handshake: bytes) -> bytes:
        self._spend_create_budget(source_ip)
        keys, reply = ntor.server_reply(self.member_id, self.onion_keys.private_for, handshake)
        self.table.create(source_ip, cid, keys)
        self.metrics.created()
        self._debug("created /2 circuit {cid} from {ip}", cid=cid, ip=source_ip)
        return encode_reply_layer(reply)

    def _refuse_v1_create(self) -> None:
        if not self.accept_v1:
            raise Forbidden(V1_REFUSED)

    # --- forward at the exit (§12) ---------------------------------------------------

    async def _exit_forward_v2(self, circuit: RelayCircuit, plaintext: bytes) -> bytes:
        kind, body = onion2.parse_frame(plaintext)
        del plaintext
        if kind == onion2.FRAME_OBJECT:
            return await self._exit_object(circuit, onion2.unpad(body))
        if not circuit.sealed:
            raise BadRequest("sealed frame on a circuit whose tracker hop is not sealed")
        sent = self.outbound.post(circuit.out_addr, cells.encode_cell(circuit.out_cid, body))
        del body
        with self._logging_failure("a message could not be delivered to the tracker", circuit):
            reply = await sent
        self.table.touch(circuit)
        return self._wrap_reply(circuit, reply, from_node=False)

    def _is_sealed_extend(self, circuit: RelayCircuit, extend: cells.Extend) -> bool:
        """A string relay to the tracker on a /2 circuit: the tracker's ntor handshake (§12)."""
        if not circuit.v2 or extend.to_tracker or extend.to != self.tracker:
            return False
        if not ntor.is_handshake(wire.b64decode(extend.relay, "extend.relay")):
            raise BadRequest("extend to the tracker: relay is neither an object nor an ntor handshake")
        return True

    # --- backward at the exit (§12) --------------------------------------------------

    def _exit_frame(self, circuit: RelayCircuit, payload, data: bytes) -> bytes:
        """An item for the peer at a /2 exit: an object in an OBJECT frame, padded
        (a chunk to its transfer's class); the tracker's sealed layer in a SEALED frame."""
        if isinstance(payload, dict):
            return padded_frame(onion2.FRAME_OBJECT, data, chunk_size_of(payload))
        if not circuit.sealed:
            raise NextHopFailed("tracker sent a sealed layer on a circuit whose tracker hop is not sealed")
        return onion2.frame(onion2.FRAME_SEALED, data)

    def _exit_item(self, circuit: RelayCircuit, cell: cells.Cell) -> bytes:
        """A backward cell from the tracker, or over a bridge, as the exit sends it on:
        /1 the object's bytes; /2 framed for the peer."""
        if not circuit.v2:
            return cell.object_bytes()
        if isinstance(cell.payload, dict):
            return padded_frame(onion2.FRAME_OBJECT, cell.object_bytes(), chunk_size_of(cell.payload))
        if not circuit.sealed:
            raise BadRequest("a base64 payload from the tracker on a circuit whose tracker hop is not sealed")
        return onion2.frame(onion2.FRAME_SEALED, cells.payload_bytes(cell))

    # --- teardown (§14) ------------------------------------------------------------

    def _layered_destroy(self, source_ip: str, cell: cells.Cell) -> bytes:
        """A destroy inside the circuit's layers: peeled (authenticated, counted), then
        the circuit is dropped and the peeled payload goes on; the exit checks the frame.
        Refused (400, 409) with nothing dropped when the layer does not open."""
        table = self.table
        circuit = table.forward(cell.cid, source_ip)
        if circuit is None:
            if table.backward(cell.cid, source_ip) is not None:
                raise BadRequest("a destroy with a payload travels towards the tracker only")
            raise UnknownCircuit("destroy for a circuit this node does not know")
        if not circuit.v2:
            raise BadRequest("a destroy cell carries no payload on an onion-http/1 circuit")
        if isinstance(cell.payload, dict):
            raise BadRequest("a destroy's payload is a base64 layer")
        peeled = circuit.layer.open_forward(cells.payload_bytes(cell))
        onward = None
        if circuit.out_cid is not None:
            if circuit.out_kind == NODE:
                onward = cells.encode_destroy(circuit.out_cid, peeled)
            else:
                onward = self._exit_destroy(circuit, peeled)
        table.remove(circuit)
        if onward is not None:
            self._notify(circuit.out_addr, onward)
        return EMPTY

    def _exit_destroy(self, circuit: RelayCircuit, peeled: bytes) -> bytes:
        """The destroy the exit sends the tracker: with the sealed layer, or bare."""
        kind, body = onion2.parse_frame(peeled)
        if kind == onion2.FRAME_SEALED:
            if not circuit.sealed:
                raise BadRequest("sealed frame on a circuit whose tracker hop is not sealed")
            return cells.encode_destroy(circuit.out_cid, body)
        if onion2.unpad(body) != onion2.DESTROY:
            raise BadRequest("a layered destroy's frame holds no destroy message")
        return cells.encode_destroy(circuit.out_cid)
