"""What a node does with one ``POST /`` cell (PROTOCOL.md §4, §5, §7, §9).

``NodeRelay.handle`` is the whole dispatch: it reads and changes the relay
table, and talks to neighbours only through the injected ``outbound``
(``post(address, body, headers) -> Deferred[bytes]`` raising NextHopFailed /
NextHopTimeout), so it is tested in memory with no sockets. Errors are
ProtocolError exceptions carrying their §3 status. What differs on an
onion-http/2 circuit is in relay_v2.py, the failure log in relay_log.py.
"""

from __future__ import annotations

import hashlib

from twisted.logger import Logger

from onion_twisted.protocol import cells, control, messages, ntor, onion2, wire
from onion_twisted.protocol.cells import EMPTY, encode_object_cell, encode_reply_layer
from onion_twisted.node.circuits import EXIT, NODE, RelayCircuit, RelayTable
from onion_twisted.protocol.crypto import open_session_key
from onion_twisted.protocol.onion_keys import OnionKeyRing
from onion_twisted.node.relay_log import RelayFailureLog
from onion_twisted.node.relay_v2 import OnionV2Relay
from onion_twisted.protocol.errors import BadRequest, Conflict, Forbidden, NextHopFailed, ProtocolError, RateLimited, UnknownCircuit
from onion_twisted.net.metrics import NodeMetrics
from onion_twisted.net.ratelimit import RateLimiter

_ALL = "all"  # the work budget's one key
DEFAULT_NODE_CREATE_RATE, DEFAULT_NODE_CREATE_BURST = 200.0, 1000
DEFAULT_CREATE_WORK_RATE, DEFAULT_CREATE_WORK_BURST = 500.0, 1000
BRIDGE_GONE = cells.encode_reply_object(messages.error_message(
    "bridge_gone", "the other side of the bridge did not take the chunk"))
# The tracker's own answer to a chunk that reached it (§8): the exit gives it instead.
NO_BRIDGE = cells.encode_reply_object(messages.error_message("no_bridge", messages.NO_BRIDGE_DETAIL))
_CHUNK_DATA = (("data",),)  # a file chunk's base64, decoded in passing (wire.loads_with_base64)


class NodeRelay(OnionV2Relay, RelayFailureLog):
    log = Logger()

    def __init__(self, *, clock, private_key, own_address: wire.Address, tracker: wire.Address,
                 table: RelayTable, outbound, directory, limiter, node_limiter=None, work_limiter=None,
                 metrics: NodeMetrics | None = None, resolve=None, control_max_skew: float = 60.0,
                 unsafe_logging: bool = False, onion_keys: OnionKeyRing | None = None, accept_v1: bool = True,
                 speak_v2: bool = True):
        self.clock = clock
        self.private_key = private_key
        self.member_id = ntor.member_id(private_key.public_key())  # ID of §11
        # A node of onion-http/1 only (speak_v2 false) has no onion key: it is listed, and
        # answers /identity, as a node from before /2; a /2 peer uses /1 with it (§10).
        self.onion_keys = None if not speak_v2 else onion_keys if onion_keys is not None else OnionKeyRing(clock)
        self.accept_v1 = accept_v1
        self.own_address = own_address
        self.port = own_address.port
        self.tracker = tracker
        self.table = table
        self.outbound = outbound
        self.directory = directory
        # Three budgets of CREATE work, all spent before the RSA decryption
        # (a CREATE that fails to decrypt costs the same CPU as one that works):
        # ``limiter`` per source IP that is not a directory node (peers),
        # ``node_limiter`` per directory node (each previous hop its own, larger
        # budget: it extends for many peers), ``work_limiter`` the node's whole
        # RSA budget per second, whoever asks.
        self.limiter = limiter
        # (``is None``, not ``or``: an empty RateLimiter has len() 0 and is false.)
        if node_limiter is None:
            node_limiter = RateLimiter(clock, DEFAULT_NODE_CREATE_RATE, DEFAULT_NODE_CREATE_BURST)
        if work_limiter is None:
            work_limiter = RateLimiter(clock, DEFAULT_CREATE_WORK_RATE, DEFAULT_CREATE_WORK_BURST, max_keys=1)
        self.node_limiter = node_limiter
        self.work_limiter = work_limiter
        self.metrics = metrics or NodeMetrics(clock)
        self.resolve = resolve or wire.literal_ip
        self.control_max_skew = control_max_skew
        self.unsafe_logging = unsafe_logging
        self._controls_seen: dict[bytes, float] = {}  # SHA-256 of the body -> issued, within the skew window
        self._failures_logged: dict[str, list] = {}  # kind of relay failure -> [last logged at, how many since]

    # --- entry point ----------------------------------------------------------------

    # A relayed chunk is held until the far end answers (store-and-forward), so
    # the handlers below drop each large buffer (received body, layers,
    # plaintext) as soon as the next one is made, before they await: a node
    # then holds about one copy per chunk in flight, not five.

    def handle(self, source_ip: str, body: bytes, signature=None):
        """Answer one cell (a coroutine): the 200 body, or raise the ProtocolError to answer."""
        return self.metrics.counting_errors(self._dispatch(source_ip, body, signature))

    async def _dispatch(self, source_ip: str, body: bytes, signature) -> bytes:
        cell = cells.parse_cell(body, chunks=True)
        if cell.is_control:
            return await self._control(body, signature, cell.payload)
        del body
        if cell.destroy:
            if cell.payload is not None:
                return self._layered_destroy(source_ip, cell)
            return self._destroy(source_ip, cell.cid)
        table = self.table
        circuit = table.forward(cell.cid, source_ip)
        if circuit is not None:
            step = self._forward(circuit, cells.payload_bytes(cell))
            del cell
            return await step
        circuit = table.backward(cell.cid, source_ip)
        if circuit is not None:
            step = self._backward(circuit, cell)
            del cell
            return await step
        bridge = table.incoming_bridge(cell.cid, source_ip)
        if bridge is not None:
            step = self._from_bridge(bridge, cell)
            del cell
            return await step
        return self._create(source_ip, cell)

    # --- create (§4.5) -----------------------------------------------------------------

    def _create(self, source_ip: str, cell: cells.Cell) -> bytes:
        if cell.cid in self.table.bridges_out:
            raise Forbidden("that CID is an outgoing bridge of this node")
        if isinstance(cell.payload, dict):
            # Objects travel only from the tracker and over bridges: this is
            # traffic for a circuit or bridge that is gone (§3: 404).
            raise UnknownCircuit("no circuit or bridge with that CID")
        sealed = cells.payload_bytes(cell)
        # A CID in use (409) or a full table (429) is refused before any key work:
        # an RSA decryption or an X25519 handshake costs far more than the refusal.
        self.table.check_room(cell.cid)
        if ntor.is_handshake(sealed):
            if self.onion_keys is None:
                raise BadRequest("this node speaks onion-http/1 only: it has no onion key")
            return self._create_v2(source_ip, cell.cid, sealed)
        self._refuse_v1_create()
        self._spend_create_budget(source_ip)
        session_key = open_session_key(self.private_key, sealed)
        circuit = self.table.create(source_ip, cell.cid, session_key)
        self.metrics.created()
        self._debug("created circuit {cid} from {ip}", cid=cell.cid, ip=source_ip)
        return encode_reply_layer(circuit.wrap_backward(cells.CREATED))

    def _spend_create_budget(self, source_ip: str) -> None:
        if self._is_directory_node(source_ip):
            if not self.node_limiter.allow(source_ip):
                raise RateLimited("too many new circuits from this node")
        elif not self.limiter.allow(source_ip):
            raise RateLimited("too many new circuits from this address")
        if not self.work_limiter.allow(_ALL):
            raise RateLimited("this node is at its budget of circuit handshakes; try again shortly")

    # --- forward (§4.2) -------------------------------------------------------------

    async def _forward(self, circuit: RelayCircuit, layer: bytes) -> bytes:
        plaintext = self.table.peel_forward(circuit, layer)
        self.metrics.relayed("forward", len(layer))
        del layer
        if circuit.out_cid is None:
            return await self._extend(circuit, onion2.unpad(plaintext) if circuit.v2 else plaintext)
        if circuit.out_kind == NODE:
            sent = self.outbound.post(circuit.out_addr, cells.encode_cell(circuit.out_cid, plaintext))
            del plaintext
            with self._logging_failure("a forward cell could not be delivered to the next hop", circuit):
                reply = await sent
                return self._wrap_reply(circuit, reply, from_node=True)
        if circuit.v2:
            return await self._exit_forward_v2(circuit, plaintext)
        return await self._exit_object(circuit, plaintext)

    async def _exit_object(self, circuit: RelayCircuit, plaintext: bytes) -> bytes:
        """At the exit: a bridged chunk goes over its bridge, any other object to the tracker."""
        message, _ = wire.loads_with_base64(plaintext, _CHUNK_DATA, "message for the tracker")
        message.pop("data", None)
        if message.get("type") in messages.CHUNK_TYPES:
            bridge = self.table.outgoing_bridge(circuit, message.get("transfer"))
            if bridge is not None:
                try:
                    sent = self.outbound.post(bridge.peer_addr, encode_object_cell(bridge.bridge_cid, plaintext))
                    del plaintext
                    reply = await sent
                except ProtocolError as e:
                    # The requester's side is gone, not this circuit: say so to
                    # the sharer (who stops this upload only) and drop the bridge.
                    self._relay_failed("a chunk could not cross the bridge", e, circuit, bridge.peer_addr)
                    self.table.remove_bridge(bridge)
                    return self._wrap_reply(circuit, BRIDGE_GONE, from_node=False)
                bridge.last_used = self.clock.seconds()
                if message["type"] == messages.TRANSFER_END:
                    self.table.remove_bridge(bridge)
                return self._wrap_reply(circuit, reply, from_node=False)
            # No bridge (it went with a chunk the other side did not take, or with its
            # circuit): the rest of the sharer's window lands here. The tracker would
            # answer no_bridge, and on a sealed circuit refuse any object outside its
            # layer (400, which reached the sharer as a 502 and cost the tracker a MiB
            # per chunk): the exit answers for it (docs 17.10, choice 59).
            return self._wrap_reply(circuit, NO_BRIDGE, from_node=False)
        sent = self.outbound.post(circuit.out_addr, encode_object_cell(circuit.out_cid, plaintext))
        del plaintext
        with self._logging_failure("a message could not be delivered to the tracker", circuit):
            reply = await sent
        self.table.touch(circuit)
        return self._wrap_reply(circuit, reply, from_node=False)

    async def _extend(self, circuit: RelayCircuit, plaintext: bytes) -> bytes:
        """EXTEND (§4.2); a circuit whose EXTEND fails is closed at once.

        Left open, one circuit could ask again and again, and each attempt
        costs the next hop an RSA decryption: a flood driven from a single
        circuit through a directory node. Closed, every attempt costs the
        sender a new circuit here, under its own CREATE budget. The previous
        hop is told (a destroy), so it drops its part too.
        """
        if circuit.extending:
            # Not an attempt: it costs no next hop anything, and the first one goes on.
            raise Conflict("an extend is already in progress on this circuit")
        try:
            return await self._try_extend(circuit, plaintext)
        except BaseException:
            if self.table.remove(circuit):
                self._notify(wire.Address(circuit.in_ip, self.port), cells.encode_destroy(circuit.in_cid))
                self.metrics.extend_failed()
            raise

    async def _try_extend(self, circuit: RelayCircuit, plaintext: bytes) -> bytes:
        extend = cells.parse_extend(plaintext, self.port)
        circuit.extending = True
        try:
            sealed = self._is_sealed_extend(circuit, extend)
            if extend.to_tracker or sealed:
                if extend.to != self.tracker:
                    raise Forbidden("exit policy: this node exits only to the network's tracker")
                kind = EXIT
            else:
                if extend.to == self.own_address:
                    raise Forbidden("a node does not extend a circuit to itself")
                if not await self.directory.knows(extend.to):
                    raise Forbidden("extend target is not a node of the directory")
                kind = NODE
            # An exit keeps the relay's one tracker address: a copy per circuit would cost ~150 bytes.
            to = self.tracker if kind == EXIT else extend.to
            out_ip = await self.resolve(to)
            out_cid = wire.new_circuit_id()
            with self._logging_failure("a circuit could not be extended to the next hop", circuit, extend.to):
                reply = await self.outbound.post(extend.to, cells.encode_cell(out_cid, extend.relay))
            answer = self._wrap_reply(circuit, reply, from_node=kind == NODE or sealed, extend=True)
            try:
                self.table.attach(circuit, to, out_ip, out_cid, kind)
                circuit.sealed = sealed
            except Conflict:
                # Destroyed while the extend was under way: pass the destroy on (§9)
                # so the next hop (or the tracker) does not keep the half-built circuit.
                self._notify(extend.to, cells.encode_destroy(out_cid))
                raise
        finally:
            circuit.extending = False
        self.table.touch(circuit)
        return answer

    def _wrap_reply(self, circuit: RelayCircuit, reply: bytes, *, from_node: bool, extend: bool = False) -> bytes:
        """§5: wrap the far end's reply payload in this hop's backward layer (framed at a /2 exit
        for a message, §12; never for an extend)."""
        try:
            payload = cells.parse_reply(reply)
        except BadRequest:
            raise NextHopFailed("next hop sent a malformed reply") from None
        if payload is None:
            return EMPTY
        if isinstance(payload, dict):
            if from_node:
                raise NextHopFailed("next hop sent an object where a layer was due")
            data = wire.dumps(payload)
        else:
            try:
                data = wire.b64decode(payload, "reply payload")
            except BadRequest:
                raise NextHopFailed("next hop sent a reply that is not base64") from None
        if circuit.v2 and not from_node and not extend:
            data = self._exit_frame(circuit, payload, data)
        self.metrics.relayed("backward", len(data))
        return encode_reply_layer(circuit.wrap_backward(data))

    # --- backward (§4.3, §4.4) ------------------------------------------------------

    async def _backward(self, circuit: RelayCircuit, cell: cells.Cell) -> bytes:
        if circuit.out_kind == EXIT:
            step = self._send_backward(circuit, self._exit_item(circuit, cell))
        else:
            step = self._send_backward(circuit, cells.payload_bytes(cell))
        del cell
        self.table.touch(circuit)
        return await step

    async def _from_bridge(self, bridge, cell: cells.Cell) -> bytes:
        ends = cells.payload_object(cell).get("type") == messages.TRANSFER_END
        circuit = bridge.circuit
        bridge.last_used = self.clock.seconds()
        self.table.touch(circuit)
        step = self._send_backward(circuit, self._exit_item(circuit, cell))
        del cell
        answer = await step
        if ends:
            self.table.remove_bridge(bridge)
        return answer

    async def _send_backward(self, circuit: RelayCircuit, data: bytes) -> bytes:
        layer = circuit.wrap_backward(data)
        del data
        self.metrics.relayed("backward", len(layer))
        sent = self.outbound.post(wire.Address(circuit.in_ip, self.port), cells.encode_cell(circuit.in_cid, layer))
        del layer
        with self._logging_failure("a backward cell could not be delivered to the previous hop", circuit,
                                   circuit.in_ip):
            await sent
        return EMPTY

    # --- destroy (§9) ----------------------------------------------------------------

    def _destroy(self, source_ip: str, cid: str) -> bytes:
        table = self.table
        circuit = table.forward(cid, source_ip)
        if circuit is not None:
            table.remove(circuit)
            if circuit.out_cid is not None:
                self._notify(circuit.out_addr, cells.encode_destroy(circuit.out_cid))
            return EMPTY
        circuit = table.backward(cid, source_ip)
        if circuit is not None:
            table.remove(circuit)
            self._notify(wire.Address(circuit.in_ip, self.port), cells.encode_destroy(circuit.in_cid))
            return EMPTY
        bridge = table.bridge_by_cid(cid)
        if bridge is not None:
            if bridge.peer_ip != source_ip:
                raise Forbidden("not this bridge's other exit")
            table.remove_bridge(bridge)
            return EMPTY
        raise UnknownCircuit("destroy for a circuit this node does not know")

    def destroy_both_ways(self, circuit: RelayCircuit, departed=frozenset()) -> None:
        """Tell both neighbours that a circuit is gone (idle expiry, shutdown), but not one at
        an IP of ``departed`` (a node that left the directory: nobody would answer)."""
        if circuit.in_ip not in departed:
            self._notify(wire.Address(circuit.in_ip, self.port), cells.encode_destroy(circuit.in_cid))
        if circuit.out_cid is not None and circuit.out_ip not in departed:
            self._notify(circuit.out_addr, cells.encode_destroy(circuit.out_cid))

    def _notify(self, address: wire.Address, body: bytes):
        """Best effort: the destroy is answered at once; the neighbour may be gone."""
        d = self.outbound.post(address, body)
        d.addErrback(lambda f: self._debug("destroy not delivered: {f}", f=f.getErrorMessage()))
        return d

    # --- control (§7) -------------------------------------------------------------------

    async def _control(self, body: bytes, signature, payload) -> bytes:
        key = await self.directory.tracker_key()
        now = self.clock.seconds()
        message = control.verify_control(body, signature, payload, key, now, self.control_max_skew, self.port)
        self._refuse_replayed_control(body, message.issued, now)
        table = self.table
        if message.type == control.DROP_BRIDGE:
            # Both ends, when both exits are this node (§7).
            ends = [b for b in (table.bridges_in.get(message.bridge_cid),
                                table.bridges_out.get(message.bridge_cid)) if b is not None]
            if not ends:
                raise UnknownCircuit("drop_bridge for a bridge this node does not know")
            for bridge in ends:
                table.remove_bridge(bridge)
            return EMPTY
        peer_ip = await self.resolve(message.peer)
        if message.type == control.MAKE_BRIDGE:
            table.make_bridge(message.cid, message.transfer, message.bridge_cid, message.peer, peer_ip)
        else:
            table.receive_bridge(message.cid, message.bridge_cid, message.peer, peer_ip)
        return EMPTY

    def _refuse_replayed_control(self, body: bytes, issued: float, now: float) -> None:
        # A signed control message is valid for the whole skew window; one
        # captured and replayed could re-create a dropped bridge. Bodies seen
        # within the window are remembered and refused a second time. The key
        # is the body's hash, not the signature's text: the signature is over
        # the body, so a replay carries the same body whatever spelling of the
        # signature it shows.
        seen = self._controls_seen
        if len(seen) > 1024:
            for old in [s for s, at in seen.items() if abs(now - at) > self.control_max_skew]:
                del seen[old]
        digest = hashlib.sha256(body).digest()
        if digest in seen:
            raise Conflict("control message replayed")
        seen[digest] = issued

    def _is_directory_node(self, ip: str) -> bool:
        # A node extending circuits for many peers sends every CREATE from its
        # one IP: directory nodes get a budget of their own, larger than a peer's.
        current = self.directory.current
        return current is not None and ip in current.node_ips
