"""The peer's side of one circuit (PROTOCOL.md §2, §3, §4.5, §5, §9).

A ``Circuit`` builds ``peer -> X -> Y -> Z -> tracker`` one hop at a time:

* ``create``: CREATE at X: an ntor handshake (§11) when X's directory
  entry has an onion key, else an RSA-OAEP sealed session key; X answers
  ``Y ‖ AUTH`` (/2), checked before X is used, or ``created`` under its
  backward layer (/1).
* ``extend`` (twice): ``{"to": Y, "relay": handshake}`` wrapped for the hops
  already built (padded inside the last one's layer when that hop is /2);
  the new hop's answer comes back through all of them.
* ``connect``: on a /2 exit when the directory gives the tracker's onion
  key, the sealed tracker hop (§12): an ntor handshake with the tracker,
  then the first message inside the tracker's own layer. Otherwise
  ``{"to": tracker, "relay": first_message}`` wrapped for X, Y, Z.

On a /2 exit everything inside the exit's layer is an exit frame (§12,
peer/hops.py): the tracker's messages SEALED (or, with no sealed hop, an
OBJECT), a sharer's bridged chunks an OBJECT padded to the chunk class.

Afterwards ``send`` carries a message to the tracker and returns its reply,
``open_backward`` decodes a cell the far end started (it arrives at the
peer's own ``POST /``), and ``destroy`` tears the circuit down.

I/O goes only through the injected ``outbound``
(``post(address, body, headers=None, path="/") -> Deferred[bytes]``, the
interface of ``http_client.HTTPOutbound``), so the class is tested with fakes
as well as over real sockets. Every failure is a ``ProtocolError``: the
outbound's NextHopFailed / NextHopTimeout pass through unchanged, a hop that
answers something other than what the protocol says is NextHopFailed, a bad
backward cell is BadRequest, a replayed one Conflict.
"""

from __future__ import annotations

import contextlib

from onion_twisted.peer import hops as hop_crypto
from onion_twisted.protocol import cells, crypto, messages, onion2, wire
from onion_twisted.protocol.directory import NodeEntry
from onion_twisted.protocol.errors import BadRequest, Conflict, NextHopFailed

# Bound on the nonces remembered per hop: far above what a short-lived circuit
# carries, small enough that a flood of backward cells cannot grow it forever.
MAX_NONCES = 1_000_000


class Circuit:
    """One circuit of a peer through ``hops`` (usually three distinct nodes) to ``tracker``."""

    def __init__(self, outbound, hops: list[NodeEntry], tracker: wire.Address, *,
                 tracker_onion_key: bytes | None = None, tracker_id: bytes | None = None,
                 cid: str | None = None):
        if not hops:
            raise ValueError("a circuit needs at least one hop")
        if len({hop.address for hop in hops}) != len(hops):
            raise ValueError("the hops of a circuit must be distinct nodes")
        self.outbound = outbound
        self.hops = list(hops)
        self.tracker = tracker
        self.cid = cid or wire.new_circuit_id()
        if not wire.is_circuit_id(self.cid):
            raise ValueError("cid must be a canonical lowercase UUIDv4")
        # Keys are checked before anything goes on the wire.
        for hop in self.hops:
            if hop.speaks_v2:
                if len(bytes.fromhex(hop.fingerprint)) != 32 or len(hop.onion_key) != 32:
                    raise ValueError("a /2 hop needs a SHA-256 fingerprint and a 32-byte onion key")
            else:
                crypto.load_public_key_pem(hop.public_key_pem)
        # The sealed tracker hop needs a /2 exit and the tracker's ID and onion key (§12).
        self._tracker_hop = None
        if self.hops[-1].speaks_v2 and tracker_onion_key is not None and tracker_id is not None:
            self._tracker_hop = (bytes(tracker_id), bytes(tracker_onion_key))
        # One per hop built, in order X, Y, Z: a /1 hop's crypto.Layer with the set of
        # its backward nonces seen, or a /2 hop's onion2.HopKeys with None.
        self.layers: list = []
        self._nonces: list[set[bytes] | None] = []
        self.tracker_layer: onion2.HopKeys | None = None  # the sealed hop, once its handshake is done
        self.connected = False
        self.destroyed = False
        self._building = False

    # --- state ---------------------------------------------------------------------

    @property
    def entry(self) -> wire.Address:
        """The first hop: where every cell of this circuit is posted."""
        return self.hops[0].address

    @property
    def built(self) -> int:
        """How many hops hold a session key."""
        return len(self.layers)

    @property
    def exit_v2(self) -> bool:
        """Whether the exit speaks /2: everything inside its layer is then an exit frame."""
        return self.hops[-1].speaks_v2

    @property
    def protocol(self) -> str:
        """onion-http/2 when every node hop speaks it (ntor, counted layers, layered destroy)."""
        return hop_crypto.V2 if all(h.speaks_v2 for h in self.hops) else hop_crypto.V1

    @property
    def sealed(self) -> bool:
        """Whether the tracker's messages travel in a layer of their own (§12)."""
        return self.tracker_layer is not None

    def info(self) -> dict:
        """What the page and the API show of the circuit's protocols."""
        return {"protocol": self.protocol, "sealed": self.sealed}

    def __repr__(self) -> str:  # names no address and no CID: reprs end up in logs
        return f"<Circuit built={self.built}/{len(self.hops)} connected={self.connected} sealed={self.sealed}>"

    def _check_usable(self) -> None:
        if self.destroyed:
            raise Conflict("the circuit was destroyed")

    # --- building ------------------------------------------------------------------

    async def create(self) -> None:
        """CREATE at the first hop (§4.5)."""
        self._check_usable()
        if self.layers:
            raise Conflict("the circuit is already created")
        with self._build_step():
            pending, handshake = hop_crypto.start_handshake(self.hops[0])
            reply = await self._post(cells.encode_cell(self.cid, handshake))
            self._check_usable()
            self._add_layer(self._expect_handshake(reply, pending, "hop 1"))

    async def extend(self) -> None:
        """EXTEND to the next hop not built yet, through the hops already built."""
        self._check_usable()
        index = len(self.layers)
        if index == 0:
            raise Conflict("create the circuit before extending it")
        if index >= len(self.hops):
            raise Conflict("every hop of the circuit is already built")
        with self._build_step():
            pending, handshake = hop_crypto.start_handshake(self.hops[index])
            message = {"to": str(self.hops[index].address), "relay": wire.b64encode(handshake)}
            reply = await self._post_onion(self._for_last_hop(wire.dumps(message)))
            self._add_layer(self._expect_handshake(reply, pending, f"hop {index + 1}"))

    async def connect(self, first_message: dict) -> dict | None:
        """Open the exit's link to the tracker with ``first_message`` (an ``ls``); its reply."""
        self._check_usable()
        if not isinstance(first_message, dict):
            raise TypeError("the first message is a JSON object")
        if len(self.layers) != len(self.hops):
            raise Conflict("build every hop before connecting to the tracker")
        if self.connected:
            raise Conflict("the circuit is already connected to the tracker")
        with self._build_step():
            if self._tracker_hop is None:
                extend = wire.dumps({"to": str(self.tracker), "relay": first_message})
                reply = await self._post_onion(self._for_last_hop(extend))
                answer = self._reply_object(reply, plain_ok=True)
            else:
                member, onion_key = self._tracker_hop
                pending, handshake = hop_crypto.start_handshake(None, member=member, onion_key=onion_key)
                extend = wire.dumps({"to": str(self.tracker), "relay": wire.b64encode(handshake)})
                reply = await self._post_onion(self._for_last_hop(extend))
                self.tracker_layer = self._expect_handshake(reply, pending, "the tracker")
                # The first message opens the catalogue entry (§8), inside the tracker's layer.
                answer = self._reply_object(await self._post_onion(self._forward_plaintext(first_message)))
            self.connected = True
        return answer

    async def build(self, first_message: dict) -> dict | None:
        """create, extend to every further hop, connect: the tracker's reply to ``first_message``."""
        await self.create()
        while len(self.layers) < len(self.hops):
            await self.extend()
        return await self.connect(first_message)

    # --- traffic -------------------------------------------------------------------

    async def send(self, message: dict | bytes, *, bridged: bool = False,
                   chunk_size: int | None = None) -> dict | None:
        """A message to the tracker (an object, or its JSON bytes already
        serialised); its reply object, or None for ``{}``.

        ``bridged``: a sharer's ``file_chunk`` or ``transfer_end``, for the
        exit's bridge: on a /2 exit an OBJECT frame outside the tracker's
        layer, padded to the class of ``chunk_size`` (§12, §14).
        """
        self._check_usable()
        if not self.connected:
            raise Conflict("the circuit is not connected to the tracker yet")
        if not isinstance(message, (dict, bytes)):
            raise TypeError("a message is a JSON object")
        # A chunk's message is not held while its acknowledgement is awaited.
        step = self._post_onion(self._forward_plaintext(message, bridged, chunk_size))
        del message
        return self._reply_object(await step, object_ok=bridged)

    def open_backward(self, payload_b64) -> dict:
        """Decode a backward cell that reached the peer's ``POST /`` on this circuit (§4.3, §5).

        Raises BadRequest if it does not peel with X, Y, Z or is not a JSON
        object, Conflict if one of its layers was seen before (replay). A
        refused cell changes no state.
        """
        self._check_usable()
        if len(self.layers) != len(self.hops):
            raise BadRequest("backward cell on a circuit that is not built")
        data = self._peel(wire.b64decode(payload_b64), len(self.layers))
        return self._open_exit(data, "backward message", object_ok=True, only_chunks=True)

    async def destroy(self) -> None:
        """``{"CID": cid, "destroy": true}`` to the first hop (§9); the circuit is unusable after."""
        if self.destroyed:
            return
        body = self._destroy_cell()
        self.destroyed = True
        self.connected = False
        self.layers = []
        self._nonces = []
        self.tracker_layer = None
        await self.outbound.post(self.entry, body)

    def _destroy_cell(self) -> bytes:
        """A layered destroy when every node hop is /2 (§14); else the bare /1 destroy,
        which a /1 node would refuse with a payload (and a /2 node reads as a link close)."""
        if not self.layers or not all(h.speaks_v2 for h in self.hops):
            return cells.encode_destroy(self.cid)
        if self.tracker_layer is not None:
            inner = onion2.frame(onion2.FRAME_SEALED, self.tracker_layer.seal_forward(
                hop_crypto.padded(onion2.DESTROY)))
        else:
            inner = hop_crypto.padded(onion2.DESTROY, kind=onion2.FRAME_OBJECT)
        onion = hop_crypto.wrap(self.layers, inner)
        return wire.with_base64({"CID": self.cid, "destroy": True}, "payload", onion)

    # --- inside --------------------------------------------------------------------

    @contextlib.contextmanager
    def _build_step(self):
        # One building step at a time: a hop refuses a second extend under way (409).
        if self._building:
            raise Conflict("another building step is under way on this circuit")
        self._building = True
        try:
            yield
        finally:
            self._building = False

    def _add_layer(self, layer) -> None:
        self.layers.append(layer)
        self._nonces.append(None if hop_crypto.is_v2(layer) else set())

    def _for_last_hop(self, plaintext: bytes) -> bytes:
        """An EXTEND as the last hop built reads it: padded when that hop is /2 (§14)."""
        return hop_crypto.padded(plaintext) if hop_crypto.is_v2(self.layers[-1]) else plaintext

    def _forward_plaintext(self, message: dict | bytes, bridged: bool = False,
                           chunk_size: int | None = None) -> bytes:
        """What the exit reads of a message: /1's plaintext, or an exit frame (§12)."""
        body = message if isinstance(message, bytes) else wire.dumps(message)
        del message
        if not self.exit_v2:
            return body
        if self.tracker_layer is not None and not bridged:
            return onion2.frame(onion2.FRAME_SEALED, self.tracker_layer.seal_forward(hop_crypto.padded(body)))
        # One buffer: a chunk is padded and framed with a single copy.
        return hop_crypto.padded(body, chunk_size=chunk_size if bridged else None, kind=onion2.FRAME_OBJECT)

    def _post(self, body: bytes):
        return self.outbound.post(self.entry, body)

    async def _post_onion(self, plaintext: bytes) -> bytes:
        onion = hop_crypto.wrap(self.layers, plaintext)
        del plaintext
        sent = self._post(cells.encode_cell(self.cid, onion))
        del onion
        reply = await sent
        self._check_usable()  # destroyed while the message was under way
        return reply

    def _reply_payload(self, reply: bytes):
        try:
            payload = cells.parse_reply(reply)
        except BadRequest as e:
            raise NextHopFailed(f"first hop sent a malformed answer: {e.detail}") from None
        if payload is not None and not isinstance(payload, str):
            raise NextHopFailed("first hop answered an object where a layer was due")
        return payload

    def _expect_handshake(self, reply: bytes, pending, who: str):
        """The new hop's layer from its answer through the hops built: checked (AUTH, or
        ``created``) before it is used; NextHopFailed, and no hop, if it does not check."""
        payload = self._reply_payload(reply)
        if payload is None:
            raise NextHopFailed(f"{who} answered no handshake reply")
        try:
            data = self._peel(wire.b64decode(payload, "reply payload"), len(self.layers))
            return hop_crypto.finish_handshake(pending, data)
        except (BadRequest, Conflict) as e:
            raise NextHopFailed(f"{who}'s handshake reply does not check: {e.detail}") from None

    def _reply_object(self, reply: bytes, *, object_ok: bool = False, plain_ok: bool = False) -> dict | None:
        payload = self._reply_payload(reply)
        if payload is None:
            return None
        try:
            data = self._peel(wire.b64decode(payload, "reply payload"), len(self.layers))
            if plain_ok and self.exit_v2 and data[:1] == b"{":
                # The answer to the unsealed connect, wrapped as the answer to an EXTEND.
                return wire.loads_object(data, "tracker's reply")
            return self._open_exit(data, "tracker's reply", object_ok=object_ok or not self.sealed)
        except BadRequest as e:
            raise NextHopFailed(f"the reply does not open: {e.detail}") from None
        except Conflict as e:
            raise NextHopFailed(f"the reply is a replay: {e.detail}") from None

    def _open_exit(self, data: bytes, what: str, *, object_ok: bool, only_chunks: bool = False) -> dict:
        """The object inside the exit's layer: /1 plaintext, or an exit frame (§12).

        A file chunk's data comes back decoded (bytes): one pass over it, no JSON copy.
        """
        if not self.exit_v2:
            return wire.loads_with_base64(data, (("data",),), what)[0]
        kind, body = hop_crypto.read_frame(data)
        del data
        if kind == onion2.FRAME_OBJECT:
            if not object_ok:
                raise BadRequest("an object where the tracker's sealed layer was due")
            message = wire.loads_with_base64(body, (("data",),), what)[0]
            if only_chunks and self.tracker_layer is not None and message.get("type") not in messages.CHUNK_TYPES:
                # Only bridged chunks travel outside the tracker's layer: an exit
                # cannot speak for the tracker (a request naming a file, say).
                raise BadRequest("only bridged chunks travel outside the tracker's layer")
            return message
        if self.tracker_layer is None:
            raise BadRequest("a sealed frame on a circuit whose tracker link is not sealed")
        plaintext = self.tracker_layer.open_backward(body)
        return wire.loads_object(hop_crypto.read_padded(plaintext), what)

    def _peel(self, data: bytes, count: int) -> bytes:
        """Remove the backward layers of the first ``count`` hops, refusing a replay."""
        return hop_crypto.peel(self.layers[:count], self._nonces[:count], data, MAX_NONCES)
