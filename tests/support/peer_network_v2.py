"""The in-memory network of peer_network.py with onion-http/2 nodes, and a sealed tracker hop (§11, §12, §14).

``V2Network(base, v2_nodes=..., sealed=True)``: the nodes whose index is in
``v2_nodes`` hold an ``OnionKeyRing`` and are listed with their onion key
(the others stay /1); with ``sealed`` the directory carries the tracker's
onion key and ``SealedFront`` stands before the real ``Tracker``.

``SealedFront`` is the tracker's side of §12 as the design writes it, built
here on protocol.ntor and protocol.onion2 so that the peer's sealed hop is
tested whatever the tracker's own code does yet: a string payload on an
unknown (exit IP, CID) is the handshake; on a known one, a tracker layer,
opened, unpadded and handed to the real tracker as the object /1 would
carry; the tracker's answer and the messages it starts (a ``request`` to
a sharer) go back sealed. ``exit_payloads`` records every payload an exit
delivered to the tracker, as the exit wrote it.
"""

from __future__ import annotations

from twisted.internet import defer

from onion_twisted.node.circuits import RelayTable
from onion_twisted.node.relay import NodeRelay
from onion_twisted.net.ratelimit import RateLimiter
from onion_twisted.protocol import cells, crypto, ntor, onion2, wire
from onion_twisted.protocol.errors import BadRequest
from onion_twisted.protocol.onion_keys import OnionKeyRing
from tests.support.in_memory import MemberOutbound
from tests.support.peer_network import NODE_ADDRESSES, NODE_IPS, NODE_KEYS, TRACKER_IP, TRACKER_KEY, Network

TRACKER_ID = ntor.member_id(TRACKER_KEY.public_key())


class SealedFront:
    """The tracker's sealed hop, before the real tracker (see the module's text)."""

    def __init__(self, network):
        self.network = network
        self.ring = OnionKeyRing(network.clock)
        self.sessions: dict[tuple[str, str], onion2.HopKeys] = {}
        self.exit_payloads: list[tuple[str, str, object]] = []  # (exit IP, CID, payload as sent)
        self.opened: list[tuple[str, str, dict]] = []            # what the tracker read inside its layer
        self.answers: list[bytes] = []  # the sealed answers, as the exit got them
        self.replay: list[bytes] = []   # answers to give (again) in place of the next ones: a lying exit's replay

    async def handle(self, sender: str, body: bytes) -> bytes:
        cell = cells.parse_cell(body)
        key = (sender, cell.cid)
        self.exit_payloads.append((sender, cell.cid, cell.payload))
        tracker = self.network.tracker
        if cell.destroy:
            if cell.payload is not None:
                keys = self.sessions.pop(key)
                if onion2.unpad(keys.open_forward(cells.payload_bytes(cell))) != onion2.DESTROY:
                    raise BadRequest("the sealed destroy holds no destroy")
            return await tracker.handle_cell(sender, cells.encode_destroy(cell.cid))
        if isinstance(cell.payload, dict):
            self.network._record_tracker_message(sender, body)
            return await tracker.handle_cell(sender, body)
        data = cells.payload_bytes(cell)
        keys = self.sessions.get(key)
        if keys is None:
            keys, reply = ntor.server_reply(TRACKER_ID, self.ring.private_for, data)
            self.sessions[key] = keys
            return cells.encode_reply_layer(reply)
        message = onion2.unpad(keys.open_forward(data))
        self.opened.append((sender, cell.cid, wire.loads_object(message)))
        self.network.tracker_messages.append((sender, cell.cid, wire.loads_object(message)))
        answer = cells.parse_reply(await tracker.handle_cell(sender, cells.encode_object_cell(cell.cid, message)))
        if answer is None:
            return cells.EMPTY
        sealed = cells.encode_reply_layer(keys.seal_backward(onion2.pad_message(wire.dumps(answer))))
        self.answers.append(sealed)
        return self.replay.pop() if self.replay else sealed

    def seal_outgoing(self, address, body: bytes) -> bytes:
        """A message the tracker starts to an exit, sealed when that circuit is."""
        cell = cells.parse_cell(body)
        keys = self.sessions.get((address.ip, cell.cid))
        if keys is None or cell.destroy or not isinstance(cell.payload, dict):
            return body
        return cells.encode_cell(cell.cid, keys.seal_backward(onion2.pad_message(cell.object_bytes())))


class V2Network(Network):
    def __init__(self, base_dir: str, *, v2_nodes=(0, 1, 2, 3), sealed: bool = True, **options):
        self.v2_nodes = set(v2_nodes)
        self.onion_rings: dict[str, OnionKeyRing] = {}
        self.front = None
        # Unsealed: the real tracker is one of onion-http/1 (no onion key in the directory).
        super().__init__(base_dir, tracker_sealed_hop=sealed, **options)
        for i, (ip, key, address) in enumerate(zip(NODE_IPS, NODE_KEYS, NODE_ADDRESSES)):
            if ip in self.onion_rings:
                public = key.public_key()
                self.tracker.registry.register(address, crypto.public_key_pem(public), crypto.fingerprint(public),
                                               ip, onion_key=self.onion_rings[ip].current_public)
        if sealed:
            self.front = SealedFront(self)
            self.tracker.registry.tracker_onion_key = self.front.ring.current_public
            # The front holds the sealed hops here, not the tracker: it says which are (§13's choice).
            self.tracker.circuit_is_sealed = lambda key: key in self.front.sessions

    def new_relay(self, key, address, tracker, directory, *, rate: float, burst: int) -> NodeRelay:
        index = NODE_ADDRESSES.index(address)
        ring = None
        if index in self.v2_nodes:
            ring = self.onion_rings[address.ip] = OnionKeyRing(self.clock)
        return NodeRelay(clock=self.clock, private_key=key, own_address=address, tracker=tracker,
                         table=RelayTable(self.clock), outbound=MemberOutbound(self, address.ip),
                         directory=directory, limiter=RateLimiter(self.clock, rate=rate, burst=burst),
                         onion_keys=ring)

    def post(self, sender: str, address, body: bytes, headers=None, path="/") -> defer.Deferred:
        if sender == TRACKER_IP and self.front is not None and path == "/":
            body = self.front.seal_outgoing(address, body)
        return super().post(sender, address, body, headers, path)

    def _dispatch(self, sender, address, body, headers, path) -> defer.Deferred:
        if self.front is not None and address.ip == TRACKER_IP and path == "/":
            return defer.ensureDeferred(self.front.handle(sender, body))
        return super()._dispatch(sender, address, body, headers, path)
