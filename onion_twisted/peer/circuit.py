"""The peer's side of one circuit (PROTOCOL.md §2, §3, §4.5, §5, §9).

A ``Circuit`` builds ``peer -> X -> Y -> Z -> tracker`` one hop at a time:

* ``create``: CREATE at X, an RSA-OAEP sealed session key; X answers
  ``created`` under its backward layer.
* ``extend`` (twice): ``{"to": Y, "relay": sealed key}`` wrapped for the hops
  already built; the new hop's ``created`` comes back through all of them.
* ``connect``: ``{"to": tracker, "relay": first_message}`` wrapped for X, Y,
  Z; the exit opens its link to the tracker and the tracker's reply comes back.

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

from onion_twisted.protocol import cells, crypto, wire
from onion_twisted.protocol.crypto import BACKWARD, Layer
from onion_twisted.protocol.directory import NodeEntry
from onion_twisted.protocol.errors import BadRequest, Conflict, NextHopFailed

# Bound on the nonces remembered per hop: far above what a short-lived circuit
# carries, small enough that a flood of backward cells cannot grow it forever.
MAX_NONCES = 1_000_000


class Circuit:
    """One circuit of a peer through ``hops`` (usually three distinct nodes) to ``tracker``."""

    def __init__(self, outbound, hops: list[NodeEntry], tracker: wire.Address, *, cid: str | None = None):
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
        # Public keys are checked before anything goes on the wire.
        self._public_keys = [crypto.load_public_key_pem(hop.public_key_pem) for hop in self.hops]
        self.layers: list[Layer] = []          # one per hop built, in order X, Y, Z
        self._nonces: list[set[bytes]] = []    # backward nonces seen, per hop
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

    def __repr__(self) -> str:  # names no address and no CID: reprs end up in logs
        return f"<Circuit built={self.built}/{len(self.hops)} connected={self.connected}>"

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
            layer, sealed = self._new_hop_key(0)
            reply = await self._post(cells.encode_cell(self.cid, sealed))
            self._check_usable()
            self._expect_created(reply, [layer], hop=0)
            self._add_layer(layer)

    async def extend(self) -> None:
        """EXTEND to the next hop not built yet, through the hops already built."""
        self._check_usable()
        index = len(self.layers)
        if index == 0:
            raise Conflict("create the circuit before extending it")
        if index >= len(self.hops):
            raise Conflict("every hop of the circuit is already built")
        with self._build_step():
            layer, sealed = self._new_hop_key(index)
            message = {"to": str(self.hops[index].address), "relay": wire.b64encode(sealed)}
            reply = await self._post_onion(message)
            self._expect_created(reply, self.layers + [layer], hop=index)
            self._add_layer(layer)

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
            reply = await self._post_onion({"to": str(self.tracker), "relay": first_message})
            self.connected = True
        return self._reply_object(reply)

    async def build(self, first_message: dict) -> dict | None:
        """create, extend to every further hop, connect: the tracker's reply to ``first_message``."""
        await self.create()
        while len(self.layers) < len(self.hops):
            await self.extend()
        return await self.connect(first_message)

    # --- traffic -------------------------------------------------------------------

    async def send(self, message: dict | bytes) -> dict | None:
        """A message to the tracker (an object, or its JSON bytes already
        serialised); its reply object, or None for ``{}``."""
        self._check_usable()
        if not self.connected:
            raise Conflict("the circuit is not connected to the tracker yet")
        if not isinstance(message, (dict, bytes)):
            raise TypeError("a message is a JSON object")
        # A chunk's message is not held while its acknowledgement is awaited.
        step = self._post_onion(message)
        del message
        return self._reply_object(await step)

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
        # A file chunk's data comes back decoded (bytes): one pass over it, no JSON copy.
        return wire.loads_with_base64(data, (("data",),), "backward message")[0]

    async def destroy(self) -> None:
        """``{"CID": cid, "destroy": true}`` to the first hop (§9); the circuit is unusable after."""
        if self.destroyed:
            return
        self.destroyed = True
        self.connected = False
        self.layers = []
        self._nonces = []
        await self.outbound.post(self.entry, cells.encode_destroy(self.cid))

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

    def _new_hop_key(self, index: int) -> tuple[Layer, bytes]:
        session_key = crypto.new_session_key()
        return Layer(session_key), crypto.seal_session_key(self._public_keys[index], session_key)

    def _add_layer(self, layer: Layer) -> None:
        self.layers.append(layer)
        self._nonces.append(set())

    def _post(self, body: bytes):
        return self.outbound.post(self.entry, body)

    async def _post_onion(self, message: dict | bytes) -> bytes:
        plaintext = message if isinstance(message, bytes) else wire.dumps(message)
        del message
        onion = crypto.wrap_onion(self.layers, plaintext)
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

    def _expect_created(self, reply: bytes, layers: list[Layer], *, hop: int) -> None:
        payload = self._reply_payload(reply)
        if payload is None:
            raise NextHopFailed(f"hop {hop + 1} answered no created reply")
        try:
            data = crypto.peel_onion(layers, wire.b64decode(payload, "reply payload"))
        except BadRequest as e:
            raise NextHopFailed(f"hop {hop + 1}'s created reply does not peel: {e.detail}") from None
        if data != cells.CREATED:
            raise NextHopFailed(f"hop {hop + 1} answered something other than created")

    def _reply_object(self, reply: bytes) -> dict | None:
        payload = self._reply_payload(reply)
        if payload is None:
            return None
        try:
            data = self._peel(wire.b64decode(payload, "reply payload"), len(self.layers))
            return wire.loads_object(data, "tracker's reply")
        except BadRequest as e:
            raise NextHopFailed(f"the reply does not open: {e.detail}") from None
        except Conflict as e:
            raise NextHopFailed(f"the reply is a replay: {e.detail}") from None

    def _peel(self, data: bytes, count: int) -> bytes:
        """Remove the backward layers of the first ``count`` hops, refusing a seen nonce.

        Nonces are remembered only once every layer peeled and none was a replay.
        """
        seen = []
        for layer, nonces in zip(self.layers[:count], self._nonces):
            nonce, data = layer.peel(data, BACKWARD)
            if nonce in nonces:
                raise Conflict("replayed backward layer")
            if len(nonces) >= MAX_NONCES:
                raise Conflict("circuit used up its nonce budget; build a new circuit")
            seen.append(nonce)
        for nonce, nonces in zip(seen, self._nonces):
            nonces.add(nonce)
        return data
