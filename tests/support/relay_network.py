"""NodeRelay in an in-memory network (PROTOCOL.md §3, §4, §5, §7, §9): the world of the test_relay_* modules.

Five nodes (127.0.0.11 .. 127.0.0.15), a fake tracker (127.0.0.1), peers
(127.0.0.101, 127.0.0.102) and a stranger (127.0.0.66) exchange cells
through ``Network.post``, which stands for an HTTP POST: it calls the target's
``handle`` with the sender's IP as the source address, and turns a refusal
(any ProtocolError) into NextHopFailed as a real hop would see a non-200
answer. Time is one ``task.Clock``; nothing touches a socket or the reactor.

A test peer builds its circuits the way a real one does: CREATE with an
RSA-OAEP sealed session key at the first node, EXTEND through the onion,
then the first message to the tracker; every reply is peeled hop by hop.
"""

from __future__ import annotations

import orjson
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import defer
from twisted.trial import unittest

from onion_twisted.protocol import cells, control, crypto, wire
from onion_twisted.protocol.errors import NextHopFailed, NextHopTimeout, ProtocolError
from onion_twisted.node.relay import NodeRelay
from tests.support.fakes import FakeDirectory, listing
from tests.support.in_memory import InMemoryWorld

PORT = 5000
NOW = 1_700_000_000
NODE_KEYS = [rsa.generate_private_key(public_exponent=65537, key_size=1024) for _ in range(5)]
TRACKER_KEY = ed25519.Ed25519PrivateKey.generate()
FORGER_KEY = ed25519.Ed25519PrivateKey.generate()
TRACKER_IP = "127.0.0.1"
TRACKER = wire.Address(TRACKER_IP, PORT)
NODE_IPS = [f"127.0.0.{11 + i}" for i in range(len(NODE_KEYS))]
PEER_IPS = ["127.0.0.101", "127.0.0.102"]
STRANGER_IP = "127.0.0.66"
FILES_REPLY = {"type": "files", "files": []}


def dumps(obj) -> bytes:
    return orjson.dumps(obj)


# --- the fake members ---------------------------------------------------------------


class FakeTracker:
    """Records (exit IP, CID, payload) of each message and answers ls/list."""

    def __init__(self):
        self.received: list[tuple[str, str, dict]] = []
        self.destroyed: list[tuple[str, str]] = []

    def handle(self, source_ip, body):
        cell = cells.parse_cell(body)
        if cell.destroy:
            self.destroyed.append((source_ip, cell.cid))
            return b"{}"
        message = cells.payload_object(cell)
        self.received.append((source_ip, cell.cid, message))
        if message.get("type") in ("ls", "list"):
            return dumps({"payload": FILES_REPLY})
        if message.get("type") in ("file_chunk", "transfer_end"):
            return dumps({"payload": {"type": "error", "error": "no_bridge", "detail": "no bridge"}})
        return b"{}"


class Recorder:
    """A member's POST / that records every cell and answers ``answer``."""

    def __init__(self, answer=b"{}"):
        self.answer = answer
        self.received: list[tuple[str, cells.Cell]] = []

    def handle(self, source_ip, body):
        self.received.append((source_ip, cells.parse_cell(body)))
        return self.answer


class Network(InMemoryWorld):
    def __init__(self, burst=20):
        super().__init__(NOW)
        self.members = {}
        self.log: list[tuple[str, wire.Address, bytes]] = []  # every POST between members
        self.refusals: list[tuple[wire.Address, int]] = []    # non-200 answers between members
        self.down: set[wire.Address] = set()
        self.slow: set[wire.Address] = set()
        self.holding: set[wire.Address] = set()
        self.held: list = []
        self.tracker = FakeTracker()
        self.members[TRACKER] = self.tracker
        addresses = [wire.Address(ip, PORT) for ip in NODE_IPS]
        self.directory = FakeDirectory(listing(addresses), TRACKER_KEY.public_key())
        self.nodes = []
        for key, address in zip(NODE_KEYS, addresses):
            node = self.new_relay(key, address, TRACKER, self.directory, rate=1.0, burst=burst)
            self.members[address] = node
            self.nodes.append(node)
        self.peers = [Peer(self, ip) for ip in PEER_IPS]
        self.stranger = Recorder()
        self.members[wire.Address(STRANGER_IP, PORT)] = self.stranger

    def post(self, sender_ip, address, body, headers=None, path="/") -> defer.Deferred:
        self.log.append((sender_ip, address, body))
        if address in self.down or address not in self.members:
            return defer.fail(NextHopFailed(f"connection refused by {address}"))
        if address in self.slow:
            return defer.fail(NextHopTimeout(f"{address} did not answer in time"))
        if address in self.holding:
            d = defer.Deferred()
            self.held.append((d, sender_ip, address, body, headers))
            return d
        return self._deliver(sender_ip, address, body, headers)

    def _deliver(self, sender_ip, address, body, headers):
        target = self.members[address]
        signature = (headers or {}).get("X-Onion-Signature")
        if isinstance(target, NodeRelay):
            d = defer.ensureDeferred(target.handle(sender_ip, body, signature))
        else:
            d = defer.maybeDeferred(target.handle, sender_ip, body)

        def refused(failure):
            failure.trap(ProtocolError)
            self.refusals.append((address, failure.value.status))
            raise NextHopFailed(f"{address} answered {failure.value.status}: {failure.value.detail}")

        return d.addErrback(refused)

    def release(self):
        """Deliver the POSTs held for the addresses in ``holding``."""
        self.holding.clear()
        held, self.held = self.held, []
        for d, sender_ip, address, body, headers in held:
            self._deliver(sender_ip, address, body, headers).chainDeferred(d)

    def node_at(self, ip) -> NodeRelay:
        return self.members[wire.Address(ip, PORT)]

    def state(self):
        """Everything a message could change in the nodes' tables (nonce sets aside)."""
        return [(sorted(n.table.by_in), sorted(n.table.by_out),
                 sorted((c.in_cid, c.out_cid, c.out_kind, str(c.out_addr)) for c in n.table.by_in.values()),
                 sorted(n.table.bridges_in), sorted(n.table.bridges_out),
                 sorted((c.in_cid, t) for c in n.table.by_in.values() for t in (c.bridges_out or {})))
                for n in self.nodes]

    def circuit_count(self):
        return sum(len(n.table) for n in self.nodes)

    def bridge_count(self):
        return sum(n.table.bridge_count for n in self.nodes)

    async def control(self, node, payload, key=TRACKER_KEY, signature=None):
        """A control cell from the tracker, as the node's HTTP layer hands it over."""
        body, good = control.sign_control(key, payload)
        return await node.handle(TRACKER_IP, body, good if signature is None else signature)

    async def from_tracker(self, node, cid, message):
        """A backward message the tracker starts by itself (§5)."""
        return await node.handle(TRACKER_IP, cells.encode_cell(cid, message))


class PeerCircuit:
    def __init__(self, cid, hop):
        self.cid = cid
        self.hops = [hop]
        self.layers: list[crypto.Layer] = []
        self.tracker_cid: str | None = None  # the exit's OutCID, as the tracker sees it

    @property
    def exit(self):
        return self.hops[-1]


class Peer:
    """The peer side of a circuit, plus the peer's own POST / for backward cells."""

    def __init__(self, network, ip):
        self.network, self.ip = network, ip
        self.address = wire.Address(ip, PORT)
        self.received: list[tuple[str, cells.Cell]] = []
        network.members[self.address] = self

    def handle(self, source_ip, body):
        self.received.append((source_ip, cells.parse_cell(body)))
        return b"{}"

    def backward(self, circuit):
        """Plaintexts of the backward cells received on ``circuit``, layers X, Y, Z peeled."""
        return [orjson.loads(crypto.peel_onion(circuit.layers, cells.payload_bytes(cell)))
                for _, cell in self.received if cell.cid == circuit.cid and not cell.destroy]

    @staticmethod
    def open(reply, layers):
        payload = cells.parse_reply(reply)
        if payload is None:
            return None
        return crypto.peel_onion(layers, wire.b64decode(payload))

    async def create(self, node) -> PeerCircuit:
        circuit = PeerCircuit(wire.new_circuit_id(), node)
        key = crypto.new_session_key()
        sealed = crypto.seal_session_key(node.private_key.public_key(), key)
        reply = await node.handle(self.ip, dumps({"CID": circuit.cid, "payload": wire.b64encode(sealed)}))
        circuit.layers.append(crypto.Layer(key))
        created = self.open(reply, circuit.layers)
        if created != b'{"type":"created"}':
            raise AssertionError(f"CREATE answered {created!r}")
        return circuit

    def cell(self, circuit, plaintext: bytes) -> bytes:
        return cells.encode_cell(circuit.cid, crypto.wrap_onion(circuit.layers, plaintext))

    async def send(self, circuit, plaintext: bytes) -> bytes:
        return await circuit.hops[0].handle(self.ip, self.cell(circuit, plaintext))

    def extend_message(self, node, key, sealed_for=None) -> bytes:
        sealed = crypto.seal_session_key((sealed_for or node).private_key.public_key(), key)
        return dumps({"to": str(node.own_address), "relay": wire.b64encode(sealed)})

    async def extend(self, circuit, node, sealed_for=None):
        key = crypto.new_session_key()
        reply = await self.send(circuit, self.extend_message(node, key, sealed_for))
        layers = circuit.layers + [crypto.Layer(key)]
        created = self.open(reply, layers)
        if created != b'{"type":"created"}':
            raise AssertionError(f"EXTEND answered {created!r}")
        circuit.layers = layers
        circuit.hops.append(node)

    async def connect(self, circuit, first=None, to=TRACKER):
        first = first or {"type": "ls", "files": ["a"]}
        tracker = self.network.tracker
        before = len(tracker.received)
        reply = await self.send(circuit, dumps({"to": str(to), "relay": first}))
        answer = orjson.loads(self.open(reply, circuit.layers))
        exit_ip, circuit.tracker_cid, seen = tracker.received[before]
        if (exit_ip, seen) != (circuit.exit.own_address.host, first):
            raise AssertionError("the tracker did not get the first message from the exit")
        return answer

    async def request(self, circuit, message: dict):
        """A message to the tracker; its reply peeled, or None."""
        data = self.open(await self.send(circuit, dumps(message)), circuit.layers)
        return None if data is None else orjson.loads(data)

    async def build(self, nodes, connect=True) -> PeerCircuit:
        circuit = await self.create(nodes[0])
        for node in nodes[1:]:
            await self.extend(circuit, node)
        if connect:
            await self.connect(circuit)
        return circuit

    async def destroy(self, circuit):
        return await circuit.hops[0].handle(self.ip, cells.encode_destroy(circuit.cid))


class RelayTestCase(unittest.TestCase):
    timeout = 10

    def setUp(self):
        self.net = Network()
        self.peer, self.peer2 = self.net.peers
        self.x, self.y, self.z, self.w, self.v = self.net.nodes

    async def refused(self, exc_type, awaitable):
        try:
            result = await awaitable
        except exc_type as e:
            return e
        self.fail(f"expected {exc_type.__name__}, got the answer {result!r}")

    def circuit_at(self, node, in_cid):
        return node.table.by_in[in_cid]

    def assertClosedAfterFailedExtend(self, circuit, before):
        """A failed EXTEND closes the circuit at every hop it reached (each told by a
        destroy), the peer gets a destroy from its entry, and nothing else changed:
        the tables are as they were before ``circuit`` was made (``before``)."""
        self.assertEqual(self.net.state(), before)
        destroys = [(ip, cell.cid) for ip, cell in self.peer.received if cell.destroy]
        self.assertEqual(destroys, [(circuit.hops[0].own_address.host, circuit.cid)])


class BridgeTestCase(RelayTestCase):
    """Requester circuit R = X, Y, Z; sharer circuit S = Y, X, W; bridge W -> Z."""

    transfer = "transfer-1"
    sharer_exit = "w"  # the node (attribute name) that ends S

    def setUp(self):
        super().setUp()
        return defer.ensureDeferred(self._build())

    async def _build(self):
        self.requester, self.sharer = self.peer, self.peer2
        self.r = await self.requester.build([self.x, self.y, self.z])
        self.s = await self.sharer.build([self.y, self.x, getattr(self, self.sharer_exit)])
        self.bridge_cid = wire.new_circuit_id()
        await self.bridge(self.r, self.s, self.bridge_cid, self.transfer)

    async def bridge(self, requester, sharer, bridge_cid, transfer):
        """§8 steps 1 and 2: receive_bridge to the requester's exit, then make_bridge to the sharer's."""
        answer = await self.net.control(requester.exit, self.receive_bridge(requester, sharer, bridge_cid))
        self.assertEqual(answer, b"{}")
        answer = await self.net.control(sharer.exit, self.make_bridge(requester, sharer, bridge_cid, transfer))
        self.assertEqual(answer, b"{}")

    def receive_bridge(self, requester, sharer, bridge_cid, **changes):
        payload = {"type": "receive_bridge", "issued": self.net.clock.seconds(), "CID": requester.tracker_cid,
                   "bridge_CID": bridge_cid, "from": str(sharer.exit.own_address)}
        payload.update(changes)
        return payload

    def make_bridge(self, requester, sharer, bridge_cid, transfer, **changes):
        payload = {"type": "make_bridge", "issued": self.net.clock.seconds(), "CID": sharer.tracker_cid,
                   "transfer": transfer, "to": str(requester.exit.own_address), "bridge_CID": bridge_cid}
        payload.update(changes)
        return payload

    def chunk(self, idx=0, data=b"hello", transfer=None):
        return {"type": "file_chunk", "transfer": transfer or self.transfer, "file": "a", "chunk_idx": idx,
                "chunk_size": 262144, "size": len(data), "data": wire.b64encode(data)}

    def end(self, transfer=None):
        return {"type": "transfer_end", "transfer": transfer or self.transfer, "status": "ok"}
