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

from onion_twisted.protocol import cells, control, crypto, messages, wire
from onion_twisted.protocol.cells import EMPTY, encode_reply_object
from onion_twisted.protocol.errors import BadRequest, Forbidden, NextHopFailed, ProtocolError, RateLimited, UnknownCircuit
from onion_twisted.protocol.messages import MessageError, parse_files, parse_request
from onion_twisted.net.metrics import TrackerMetrics
from onion_twisted.tracker.catalogue import Catalogue
from onion_twisted.tracker.registry import NodeRegistry


class Tracker:
    log = Logger()

    def __init__(self, *, clock, signing_key, own_address: wire.Address, catalogue: Catalogue,
                 registry: NodeRegistry, outbound, resolve=None, max_pending: int = 10_000,
                 metrics: TrackerMetrics | None = None):
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

    # --- POST / : messages from exit nodes ------------------------------------------

    async def handle_cell(self, source_ip: str, body: bytes) -> bytes:
        return await self.metrics.counting_errors(self._dispatch(source_ip, body))

    async def _dispatch(self, source_ip: str, body: bytes) -> bytes:
        cell = cells.parse_cell(body)
        if cell.is_control:
            raise BadRequest("the tracker takes no control messages")
        if not self.registry.is_node_ip(source_ip):
            raise Forbidden("only directory nodes relay to the tracker")
        key = (source_ip, cell.cid)
        if cell.destroy:
            if not self.catalogue.forget(key):
                raise UnknownCircuit("destroy for a circuit the tracker does not know")
            return EMPTY
        message = cells.payload_object(cell)
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
                return self.catalogue.files_answer()
            if kind == messages.LIST:
                self.catalogue.circuit(key, exit_address)
                return self.catalogue.files_answer()
            if kind == messages.REQUEST:
                request = parse_request(message)
                circuit = self.catalogue.circuit(key, exit_address)
                return encode_reply_object(await self._request(circuit, request))
            if kind in messages.CHUNK_TYPES:
                raise MessageError("no_bridge", "no bridge for this transfer: chunks go to the requester's exit")
            raise MessageError("bad_request", "unknown message type")
        except MessageError as e:
            self.metrics.refused(e.error)
            return encode_reply_object(e.reply())

    # --- request: the bridge sequence (§8) ------------------------------------------------

    async def _request(self, requester, request) -> dict:
        if self.pending >= self.max_pending:
            raise MessageError("busy", "too many transfers being set up; try again")
        source, shared = self.catalogue.choose_source(request, requester.key)
        transfer = wire.new_circuit_id()
        bridge_cid = wire.new_circuit_id()
        bridged = []
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
            ask = messages.source_request_message(request, transfer, shared.sha256)
            await self.outbound.post(source.exit, cells.encode_object_cell(source.key[1], wire.dumps(ask)))
        except ProtocolError as e:
            self.metrics.request("failed")
            for exit_address in set(bridged):
                self._drop_bridge(exit_address, bridge_cid)
            raise MessageError("source_failed", f"the source could not be reached: {e.detail}") from None
        finally:
            self.pending -= 1
        self.catalogue.start_transfer(source, transfer, shared.size)
        self.metrics.request("bridged")
        return messages.transfer_message(transfer, request.file, shared.size, shared.sha256, request.chunk_size)

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
        host_ip = address.ip or await self.resolve(address)
        if host_ip != source_ip:
            raise Forbidden("a node registers only its own address")
        if not self.registry.already_verified(address, fingerprint):
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
            self.log.info("node {fp} joined the directory", fp=fingerprint[:16])
        if not self.registry.register(address, crypto.public_key_pem(key), fingerprint, host_ip):
            raise RateLimited("the directory is full")
        return wire.dumps({"registered": True, "heartbeat": self.registry.heartbeat})

    def expire(self) -> None:
        self.catalogue.expire()
        for address in self.registry.expire():
            self.log.info("a node left the directory (unseen for three heartbeats)")

