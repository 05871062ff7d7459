"""What the tracker does with each request (PROTOCOL.md §6, §7, §8).

``Tracker`` holds the catalogue and the node registry and talks to nodes
only through the injected ``outbound`` (``post``/``get`` raising
NextHopFailed / NextHopTimeout), so the whole bridge sequence is tested in
memory. It knows circuits only as (exit IP, CID) and never stores, logs or
shows an address that is not a node's.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from onion_twisted.protocol import cells, checks, control, crypto, messages, ntor, onion2, wire
from onion_twisted.protocol.cells import EMPTY
from onion_twisted.protocol.errors import (BadRequest, Forbidden, NextHopFailed, NextHopTimeout, ProtocolError,
                                           RateLimited, UnknownCircuit)
from onion_twisted.protocol.messages import MessageError, parse_files, parse_request
from onion_twisted.protocol.onion_keys import OnionKeyRing, parse_onion_key
from onion_twisted.net.metrics import TrackerMetrics
from onion_twisted.tracker.catalogue import Catalogue
from onion_twisted.tracker.registry import NodeRegistry
from onion_twisted.tracker import sealed
from onion_twisted.tracker.source_checks import SourceChecks

# A sealed message is padded to 1 KiB at least (§14): anything this long on an unknown
# circuit is a layer, not a handshake (97 bytes).
SMALLEST_SEALED_LAYER = onion2.padded_size(0) + onion2.OVERHEAD


class Tracker:
    log = Logger()

    def __init__(self, *, clock, signing_key, own_address: wire.Address, catalogue: Catalogue,
                 registry: NodeRegistry, outbound, resolve=None, max_pending: int = 10_000,
                 metrics: TrackerMetrics | None = None, onion_keys: OnionKeyRing | None = None,
                 sealed_hop: bool = True):
        self.clock = clock
        self.signing_key = signing_key
        self.own_address = own_address
        self.port = own_address.port
        self.catalogue = catalogue
        self.registry = registry
        self.outbound = outbound
        self.resolve = resolve or wire.literal_ip
        self.max_pending = max_pending
        self.pending = 0
        self.metrics = metrics or TrackerMetrics(clock)
        self.public_key_b64 = crypto.tracker_public_b64(signing_key)
        # The tracker's X25519 onion keys (§11): the service passes the ring kept
        # on disk; without one (tests, benches) a ring lives in memory. Without
        # ``sealed_hop`` the tracker is one of onion-http/1 (no key published, no
        # sealed circuits), as peers and nodes of /2 must still meet.
        self.onion_keys = (onion_keys or OnionKeyRing(clock)) if sealed_hop else None
        self.member_id = ntor.member_id(signing_key.public_key())
        self.sealed = sealed.SealedCircuits(clock, self.onion_keys, self.member_id,
                                            max_circuits=catalogue.max_circuits,
                                            idle_timeout=catalogue.idle_timeout)
        self.registry.tracker_onion_key = self.onion_keys.current_public if sealed_hop else None
        self.source_checks = SourceChecks(clock)

    def rotate_onion_key(self) -> bool:
        """Rotate the onion key when due (the directory is signed again with the new one),
        and drop a previous key past its grace; True when the ring changed (save it)."""
        ring = self.onion_keys
        if ring is None:
            return False
        before = (ring.current_public, ring.retired)
        ring.rotate_if_due()
        self.registry.tracker_onion_key = ring.current_public
        return (ring.current_public, ring.retired) != before

    # --- POST / : messages from exit nodes ------------------------------------------

    async def handle_cell(self, source_ip: str, body: bytes) -> bytes:
        return await self.metrics.counting_errors(self._dispatch(source_ip, body))

    async def _dispatch(self, source_ip: str, body: bytes) -> bytes:
        cell = sealed.parse_tracker_cell(body)
        if cell.is_control:
            raise BadRequest("the tracker takes no control messages")
        if not self.registry.is_node_ip(source_ip):
            raise Forbidden("only directory nodes relay to the tracker")
        key = (source_ip, cell.cid)
        if cell.destroy:
            return self._destroy(key, cell)
        hop = self.sealed.get(key)
        if isinstance(cell.payload, dict):
            if hop is not None:
                raise BadRequest("an object payload on a sealed circuit: its messages go inside the tracker's layer")
            reply = await self._message(key, source_ip, cell.payload)
            return self.catalogue.files_answer() if reply is None else cells.encode_reply_object_bytes(reply)
        data = cells.payload_bytes(cell)
        if hop is None:
            if key in self.catalogue.circuits:
                raise BadRequest("a handshake on a circuit already open without the tracker's layer")
            if len(data) >= SMALLEST_SEALED_LAYER:
                # A sealed layer for keys this tracker does not hold (it restarted, or
                # forgot the circuit): 404 as for any unknown circuit; the peer builds anew.
                raise UnknownCircuit("no sealed hop on this circuit at the tracker")
            # A string payload on an unknown circuit is the sealed hop's handshake (§12).
            return cells.encode_reply_layer(self.sealed.handshake(key, data))
        message = sealed.open_object(hop, data)
        reply = await self._message(key, source_ip, message)
        if key in self.catalogue.circuits:
            self.sealed.opened(key)
        return sealed.seal_answer(hop, self.catalogue.files_reply_json() if reply is None else reply)

    def _destroy(self, key, cell) -> bytes:
        """A bare destroy (a link-level close) forgets the circuit; a layered one
        (§14) must hold ``{"type":"destroy"}`` under the circuit's tracker layer."""
        if cell.payload is not None:
            hop = self.sealed.get(key)
            if hop is None:
                if key in self.catalogue.circuits:
                    raise BadRequest("a layered destroy on a circuit without the tracker's layer")
                raise UnknownCircuit("destroy for a circuit the tracker does not know")
            if sealed.open_message(hop, cells.payload_bytes(cell)) != onion2.DESTROY:
                raise BadRequest('the layered destroy does not hold {"type":"destroy"}')
        if not self._forget(key):
            raise UnknownCircuit("destroy for a circuit the tracker does not know")
        return EMPTY

    def _forget(self, key) -> bool:
        """The circuit is gone (destroyed, or a message down it failed): its files and its
        sealed hop go. Whether the tracker knew it."""
        forgot_sealed = self.sealed.forget(key)
        return self.catalogue.forget(key) or forgot_sealed

    async def _message(self, key, source_ip: str, message: dict) -> bytes | None:
        """The reply to one message, as JSON bytes; None for the catalogue's files reply
        (cached whole, answered as it is on an unsealed circuit)."""
        kind = message.get("type")
        self.metrics.message(kind if isinstance(kind, str) else None)
        exit_address = wire.Address(source_ip, self.port)
        try:
            # A message is checked before its circuit is recorded: a bad one changes nothing (§3).
            if kind == messages.LS:
                files = parse_files(message.get("files"), self.catalogue.max_files)
                new = key not in self.catalogue.circuits
                circuit = self.catalogue.circuit(key, exit_address)
                try:
                    self.catalogue.announce(circuit, files)
                except MessageError:
                    if new:
                        self.catalogue.forget(key)
                    raise
                return None
            if kind == messages.LIST:
                self.catalogue.circuit(key, exit_address)
                return None
            if kind == messages.REQUEST:
                request = parse_request(message)
                circuit = self.catalogue.circuit(key, exit_address)
                return wire.dumps(await self._request(circuit, request))
            if kind == checks.CHECK:
                transfer = checks.parse_check(message)
                self.catalogue.circuit(key, exit_address)
                state = await self._check(transfer)
                self.metrics.checked(state)
                return wire.dumps(checks.checked_message(transfer, state))
            if kind in messages.CHUNK_TYPES:
                raise MessageError("no_bridge", messages.NO_BRIDGE_DETAIL)
            raise MessageError("bad_request", "unknown message type")
        except MessageError as e:
            self.metrics.refused(e.error)
            return wire.dumps(e.reply())

    # --- request: the bridge sequence (§8) ------------------------------------------------

    async def _request(self, requester, request) -> dict:
        if self.pending >= self.max_pending:
            raise MessageError("busy", "too many transfers being set up; try again")
        # End to end (§13) only between two sealed circuits: the requester's key must
        # cross no exit in the clear, on its way in or out.
        source, shared, e2e = self.catalogue.choose_source(request, requester.key, is_sealed=self.circuit_is_sealed)
        source_hop = self.sealed.get(source.key)  # kept: the circuit may go while the bridge is made
        transfer = wire.new_circuit_id()
        bridge_cid = wire.new_circuit_id()
        bridged = []
        # Counted under way from the moment it is chosen: requests set up at the same
        # time (a download asking several sources at once) see each other's load.
        self.catalogue.start_transfer(source, transfer, _asked_bytes(request, shared.size))
        self.pending += 1
        try:
            await self._control(requester.exit, {
                "type": control.RECEIVE_BRIDGE, "CID": requester.key[1],
                "bridge_CID": bridge_cid, "from": str(source.exit)})
            bridged.append(requester.exit)
            await self._control(source.exit, {
                "type": control.MAKE_BRIDGE, "CID": source.key[1], "transfer": transfer,
                "to": str(requester.exit), "bridge_CID": bridge_cid})
            bridged.append(source.exit)
            ask = messages.source_request_message(request, transfer, shared.sha256, shared.root, e2e)
            # The request names the file: on a sealed circuit only the sharer can read it (§12).
            await self.outbound.post(source.exit, _cell_for(source, source_hop, ask))
        except ProtocolError as e:
            self.metrics.request("failed")
            self.catalogue.end_transfer(source, transfer)
            for exit_address in set(bridged):
                self._drop_bridge(exit_address, bridge_cid)
            if bridged:
                # The requester's exit took its end: the source's exit failed. Its circuit is
                # not offered again (a dead exit would win every later choice, having no
                # transfers under way); a live sharer announces again on a new circuit.
                self._forget(source.key)
            raise MessageError("source_failed", f"the source could not be reached: {e.detail}") from None
        finally:
            self.pending -= 1
        self.metrics.request("bridged")
        return messages.transfer_message(transfer, request.file, shared.size, shared.sha256, request.chunk_size,
                                         shared.root, e2e)

    # --- check: does a transfer's source still reach its sharer? (docs 17.10, choice 64) --------

    async def _check(self, transfer: str) -> str:
        key = self.catalogue.transfer_sources.get(transfer)
        if key is None:
            return checks.UNKNOWN
        source = self.catalogue.circuits.get(key)
        if source is None:
            return checks.GONE  # destroyed, expired, or forgotten after a failed request
        # Asked of ``circuit_is_sealed``, as the request's choice asks, and the hop looked up
        # again at the probe: what holds the hops says (a test network's front holds them).
        if not self.circuit_is_sealed(key):
            # Probed only inside the tracker's layer: a sharer of another implementation
            # on an unsealed circuit might refuse a message it does not know, which would
            # read as a broken circuit.
            return checks.UNKNOWN
        return await self.source_checks.check(key, lambda: self._probe_source(source, transfer))

    async def _probe_source(self, source, transfer: str) -> str:
        cell = _cell_for(source, self.sealed.get(source.key), checks.check_message(transfer))
        try:
            await self.outbound.post(source.exit, cell)
        except NextHopTimeout:
            return checks.UNKNOWN  # slow is not gone: a live sharer under load may answer late
        except ProtocolError:
            self._forget(source.key)  # as after a failed request: not offered again
            return checks.GONE
        return checks.REACHABLE

    def circuit_is_sealed(self, key) -> bool:
        """Whether the circuit ``key`` reaches the tracker through its sealed hop (§12)."""
        return self.sealed.get(key) is not None

    def _control(self, exit_address: wire.Address, payload: dict) -> defer.Deferred:
        payload["issued"] = int(self.clock.seconds())
        body, signature = control.sign_control(self.signing_key, payload)
        return self.outbound.post(exit_address, body, headers={wire.SIGNATURE_HEADER: signature})

    def _drop_bridge(self, exit_address: wire.Address, bridge_cid: str) -> None:
        d = self._control(exit_address, {"type": control.DROP_BRIDGE, "bridge_CID": bridge_cid})
        d.addErrback(lambda f: None)  # best effort: the bridge also goes after 10 idle minutes

    # --- the directory ------------------------------------------------------------------

    async def register_node(self, source_ip: str, body: bytes) -> bytes:
        return await self.metrics.counting_errors(self._register(source_ip, body))

    async def _register(self, source_ip: str, body: bytes) -> bytes:
        obj = wire.loads_object(body, "registration")
        address = wire.parse_address(obj.get("address"), self.port, field="address")
        if address.port != self.port:
            raise Forbidden("a node registers at the network's port only")
        key = crypto.load_public_key_pem(obj.get("public_key"))
        fingerprint = crypto.fingerprint(key)
        onion_key = _optional_onion_key(obj.get("onion_key"), "onion_key")
        host_ip = address.ip or await self.resolve(address)
        if host_ip != source_ip:
            raise Forbidden("a node registers only its own address")
        if not self.registry.already_verified(address, fingerprint, onion_key):
            status, _, identity_body = await self.outbound.get(address, "/identity")
            if status != 200:
                raise NextHopFailed(f"the node's /identity answered {status}")
            try:
                identity = wire.loads_object(identity_body, "identity")
                shown = crypto.fingerprint(crypto.load_public_key_pem(identity.get("public_key")))
            except BadRequest:
                raise Forbidden("the node's /identity shows no valid key") from None
            if shown != fingerprint:
                raise Forbidden("the node's /identity shows another key")
            if onion_key is not None and _shown_onion_key(identity) != onion_key:
                raise Forbidden("the node's /identity shows another onion key")
            self.log.info("node {fp} joined the directory", fp=fingerprint[:16])
        if not self.registry.register(address, crypto.public_key_pem(key), fingerprint, host_ip, onion_key):
            raise RateLimited("the directory is full")
        return wire.dumps({"registered": True, "heartbeat": self.registry.heartbeat})

    def expire(self) -> None:
        gone = {address.ip for address in self.registry.expire()}
        for _ in gone:
            self.log.info("a node left the directory (unseen for three heartbeats)")
        if gone:
            # Its circuits go with it, as Tor closes a relay's circuits when it leaves: the
            # tracker takes no message from an exit outside the directory, so they can carry
            # nothing more, and their files would stay in the catalogue, offered as sources,
            # until circuit_idle_timeout. A node back at that address starts with no circuits.
            for key in [key for key in self.catalogue.circuits if key[0] in gone]:
                self._forget(key)
        self.catalogue.expire()
        self.sealed.expire(self.catalogue.circuits)



def _optional_onion_key(value, field: str) -> bytes | None:
    """A registration's onion key (§10): absent for a /1 node; not base64 of 32 bytes -> 400."""
    if value is None:
        return None
    try:
        return parse_onion_key(value, field)
    except ValueError as e:
        raise BadRequest(str(e)) from None


def _shown_onion_key(identity: dict) -> bytes | None:
    try:
        return _optional_onion_key(identity.get("onion_key"), "identity onion_key")
    except BadRequest:
        return None


def _cell_for(circuit, hop, message: dict) -> bytes:
    """A message the tracker starts, down ``circuit``: sealed under its tracker ``hop`` (§12),
    or as an object when it has none."""
    if hop is not None:
        return sealed.seal_cell(hop, circuit.key[1], wire.dumps(message))
    return cells.encode_object_cell(circuit.key[1], wire.dumps(message))


def _asked_bytes(request, size: int | None) -> int | None:
    """What a request asks of its source: its ``chunks`` (one block of a download asking
    several sources) or the whole file; the tracker's estimate of how long it lasts."""
    if request.chunks is None or size is None:
        return size
    count = -(-size // request.chunk_size)
    covered, reached = 0, 0  # merged ranges: a request may name up to 65 536 of them
    for a, b in sorted(request.chunks):
        a, b = max(a, reached), min(b, count)
        if b > a:
            covered += b - a
            reached = b
    return min(size, covered * request.chunk_size)
