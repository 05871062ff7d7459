"""NodeRelay in an in-memory network (PROTOCOL.md §3, §4, §5, §7, §9).

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
from twisted.internet import defer, task
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial import unittest

from onion_twisted.protocol import cells, control, crypto, wire
from onion_twisted.node.circuits import EXIT, NODE, RelayTable
from onion_twisted.protocol.errors import (BadRequest, Conflict, Forbidden, NextHopFailed, NextHopTimeout,
                                  ProtocolError, RateLimited, UnknownCircuit)
from onion_twisted.net.ratelimit import RateLimiter
from onion_twisted.node.relay import NodeRelay
from tests.support.deferreds import inline
from tests.support.in_memory import MemberOutbound

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


class FakeDirectory:
    def __init__(self, addresses, key):
        self.addresses = set(addresses)
        self.key = key

    async def knows(self, address):
        return address in self.addresses

    async def tracker_key(self):
        return self.key


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


class Network:
    def __init__(self, burst=20):
        self.clock = task.Clock()
        self.clock.advance(NOW)
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
        self.directory = FakeDirectory(addresses, TRACKER_KEY.public_key())
        self.nodes = []
        for ip, key, address in zip(NODE_IPS, NODE_KEYS, addresses):
            node = NodeRelay(clock=self.clock, private_key=key, own_address=address, tracker=TRACKER,
                             table=RelayTable(self.clock), outbound=MemberOutbound(self, ip),
                             directory=self.directory, limiter=RateLimiter(self.clock, rate=1.0, burst=burst))
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


# --- circuits: build, messages both ways ----------------------------------------------


class BuildTests(RelayTestCase):
    @inline
    async def test_create_answers_created_under_the_session_key(self):
        circuit = await self.peer.create(self.x)  # the helper checks the created layer
        stored = self.circuit_at(self.x, circuit.cid)
        self.assertEqual((stored.in_ip, stored.out_cid), (self.peer.ip, None))
        self.assertEqual(len(self.x.table), 1)

    @inline
    async def test_created_layer_is_backward(self):
        key = crypto.new_session_key()
        cid = wire.new_circuit_id()
        sealed = crypto.seal_session_key(self.x.private_key.public_key(), key)
        reply = await self.x.handle(self.peer.ip, cells.encode_cell(cid, sealed))
        layer = wire.b64decode(cells.parse_reply(reply))
        self.assertRaises(BadRequest, crypto.Layer(key).peel, layer, crypto.FORWARD)
        self.assertEqual(crypto.Layer(key).peel(layer, crypto.BACKWARD)[1], cells.CREATED)

    @inline
    async def test_three_hop_circuit_to_the_tracker(self):
        circuit = await self.peer.create(self.x)
        await self.peer.extend(circuit, self.y)
        await self.peer.extend(circuit, self.z)
        answer = await self.peer.connect(circuit, {"type": "ls", "files": ["a"]})
        self.assertEqual(answer, FILES_REPLY)
        self.assertEqual(self.net.tracker.received, [(self.z.own_address.host, circuit.tracker_cid,
                                                      {"type": "ls", "files": ["a"]})])
        at_x = self.circuit_at(self.x, circuit.cid)
        at_y = self.circuit_at(self.y, at_x.out_cid)
        at_z = self.circuit_at(self.z, at_y.out_cid)
        self.assertEqual((at_x.in_ip, at_x.out_addr, at_x.out_kind), (self.peer.ip, self.y.own_address, NODE))
        self.assertEqual((at_y.in_ip, at_y.out_addr, at_y.out_kind), (self.x.own_address.host, self.z.own_address, NODE))
        self.assertEqual((at_z.in_ip, at_z.out_addr, at_z.out_kind, at_z.out_cid),
                         (self.y.own_address.host, TRACKER, EXIT, circuit.tracker_cid))
        # every link has its own CID: no two hops can link the circuit by its id
        cids = [circuit.cid, at_x.out_cid, at_y.out_cid, at_z.out_cid]
        self.assertEqual(len(set(cids)), 4)
        self.assertTrue(all(wire.is_circuit_id(c) for c in cids))
        self.assertEqual([len(n.table) for n in self.net.nodes], [1, 1, 1, 0, 0])

    @inline
    async def test_extend_reply_peels_with_every_hop(self):
        circuit = await self.peer.build([self.x, self.y], connect=False)
        key = crypto.new_session_key()
        reply = await self.peer.send(circuit, self.peer.extend_message(self.z, key))
        layer = wire.b64decode(cells.parse_reply(reply))
        # X's layer outermost, then Y's, then Z's own created layer
        _, inner = circuit.layers[0].peel(layer, crypto.BACKWARD)
        _, inner = circuit.layers[1].peel(inner, crypto.BACKWARD)
        self.assertEqual(crypto.Layer(key).peel(inner, crypto.BACKWARD)[1], cells.CREATED)

    @inline
    async def test_one_hop_circuit_to_the_tracker(self):
        circuit = await self.peer.build([self.x])
        self.assertEqual(self.circuit_at(self.x, circuit.cid).out_kind, EXIT)
        self.assertEqual(await self.peer.request(circuit, {"type": "list"}), FILES_REPLY)

    @inline
    async def test_circuits_share_nodes_independently(self):
        first = await self.peer.build([self.x, self.y, self.z])
        second = await self.peer2.build([self.z, self.y, self.x])
        self.assertEqual([len(n.table) for n in self.net.nodes], [2, 2, 2, 0, 0])
        self.assertNotEqual(first.tracker_cid, second.tracker_cid)
        self.assertEqual(await self.peer2.request(second, {"type": "list"}), FILES_REPLY)
        self.assertEqual(self.net.tracker.received[-1][:2], (self.x.own_address.host, second.tracker_cid))


class MessageTests(RelayTestCase):
    @inline
    async def test_forward_message_reaches_tracker_as_plaintext_object(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        message = {"type": "request", "file": "a", "chunks": [[0, 2]], "name": "é"}
        reply = await self.peer.request(circuit, message)
        self.assertIsNone(reply)  # the fake tracker answers {} to a request
        self.assertEqual(self.net.tracker.received[-1], (self.z.own_address.host, circuit.tracker_cid, message))

    @inline
    async def test_tracker_reply_travels_back(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        self.assertEqual(await self.peer.request(circuit, {"type": "list"}), FILES_REPLY)

    @inline
    async def test_no_reply_payload_is_empty_object_at_every_hop(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        self.assertEqual(await self.peer.send(circuit, dumps({"type": "noop"})), b"{}")

    @inline
    async def test_backward_message_from_tracker_reaches_peer(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        message = {"type": "request", "file": "a", "transfer": "t-1", "chunk_size": 262144}
        answer = await self.net.from_tracker(self.z, circuit.tracker_cid, message)
        self.assertEqual(answer, b"{}")
        self.assertEqual(self.peer.backward(circuit), [message])
        (source, cell), = self.peer.received
        self.assertEqual(source, self.x.own_address.host)  # from the first hop, on the peer's CID

    @inline
    async def test_backward_cell_carries_three_layers(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        await self.net.from_tracker(self.z, circuit.tracker_cid, {"type": "ping"})
        (_, cell), = self.peer.received
        layer = cells.payload_bytes(cell)
        self.assertEqual(len(layer), len(b'{"type":"ping"}') + 3 * 28)
        self.assertRaises(BadRequest, crypto.peel_onion, circuit.layers[1:], layer)

    @inline
    async def test_many_messages_both_ways(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        for i in range(10):
            await self.peer.request(circuit, {"type": "note", "i": i})
            await self.net.from_tracker(self.z, circuit.tracker_cid, {"type": "note", "i": -i})
        self.assertEqual([m["i"] for _, _, m in self.net.tracker.received[1:]], list(range(10)))
        self.assertEqual([m["i"] for m in self.peer.backward(circuit)], [-i for i in range(10)])

    @inline
    async def test_large_message_both_ways(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        data = wire.b64encode(bytes(range(256)) * 1024)  # 256 KiB chunk
        await self.peer.request(circuit, {"type": "big", "data": data})
        self.assertEqual(self.net.tracker.received[-1][2]["data"], data)
        await self.net.from_tracker(self.z, circuit.tracker_cid, {"type": "big", "data": data})
        self.assertEqual(self.peer.backward(circuit)[-1]["data"], data)

    @inline
    async def test_traffic_keeps_the_circuit_alive(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        self.net.clock.advance(500)
        await self.peer.request(circuit, {"type": "list"})
        self.net.clock.advance(500)
        for node in (self.x, self.y, self.z):
            self.assertEqual(node.table.expire(), [])
        self.net.clock.advance(101)
        for node in (self.x, self.y, self.z):
            self.assertEqual(len(node.table.expire()), 1)


# --- replay, neighbours, extend policy --------------------------------------------------


class ReplayTests(RelayTestCase):
    @inline
    async def test_replayed_forward_cell_is_409_and_not_relayed(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        body = self.peer.cell(circuit, dumps({"type": "list"}))
        await self.x.handle(self.peer.ip, body)
        count = len(self.net.tracker.received)
        e = await self.refused(Conflict, self.x.handle(self.peer.ip, body))
        self.assertEqual(e.status, 409)
        self.assertEqual(len(self.net.tracker.received), count)

    @inline
    async def test_replay_between_nodes_is_409_and_not_relayed(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        start = len(self.net.log)
        await self.peer.request(circuit, {"type": "list"})
        # the cell X sent to Y, replayed by an observer who can use X's address
        (sender, address, body), = [entry for entry in self.net.log[start:] if entry[1] == self.y.own_address]
        count = len(self.net.tracker.received)
        await self.refused(Conflict, self.y.handle(sender, body))
        self.assertEqual(len(self.net.tracker.received), count)

    @inline
    async def test_replayed_create_is_not_a_second_circuit(self):
        key = crypto.new_session_key()
        body = cells.encode_cell(wire.new_circuit_id(), crypto.seal_session_key(self.x.private_key.public_key(), key))
        await self.x.handle(self.peer.ip, body)
        # the same CREATE again is a forward cell on that circuit: not a layer of its key
        await self.refused(BadRequest, self.x.handle(self.peer.ip, body))
        self.assertEqual(len(self.x.table), 1)


class NeighbourTests(RelayTestCase):
    @inline
    async def test_stranger_ip_on_in_cid_is_403(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        count = len(self.net.tracker.received)
        e = await self.refused(Forbidden, self.x.handle(STRANGER_IP, self.peer.cell(circuit, dumps({"type": "list"}))))
        self.assertEqual(e.status, 403)
        self.assertEqual(len(self.net.tracker.received), count)

    @inline
    async def test_stranger_ip_on_out_cid_is_403(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        body = cells.encode_cell(circuit.tracker_cid, {"type": "request", "file": "a"})
        await self.refused(Forbidden, self.z.handle(STRANGER_IP, body))
        self.assertEqual(self.peer.received, [])

    @inline
    async def test_wrong_hop_on_middle_cids_is_403(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        at_x = self.circuit_at(self.x, circuit.cid)
        # Y's InCID is X's OutCID: only X may send on it forward, only Z backward on Y's OutCID
        await self.refused(Forbidden, self.y.handle(self.z.own_address.host, cells.encode_cell(at_x.out_cid, b"x" * 40)))
        at_y = self.circuit_at(self.y, at_x.out_cid)
        await self.refused(Forbidden, self.y.handle(self.x.own_address.host, cells.encode_cell(at_y.out_cid, b"x" * 40)))
        self.assertEqual(self.peer.received, [])

    @inline
    async def test_stranger_destroy_is_403_and_circuit_kept(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        before = self.net.state()
        await self.refused(Forbidden, self.x.handle(STRANGER_IP, cells.encode_destroy(circuit.cid)))
        await self.refused(Forbidden, self.z.handle(STRANGER_IP, cells.encode_destroy(circuit.tracker_cid)))
        self.assertEqual(self.net.state(), before)
        self.assertEqual(self.net.tracker.destroyed, [])


class ExtendPolicyTests(RelayTestCase):
    @inline
    async def test_extend_to_non_directory_address_is_403_and_closes_the_circuit(self):
        before = self.net.state()
        circuit = await self.peer.create(self.x)
        stranger = wire.Address(STRANGER_IP, PORT)
        message = dumps({"to": str(stranger), "relay": wire.b64encode(b"\x00" * 128)})
        e = await self.refused(Forbidden, self.peer.send(circuit, message))
        self.assertEqual(e.status, 403)
        self.assertEqual(self.net.stranger.received, [])
        self.assertClosedAfterFailedExtend(circuit, before)
        # The circuit is gone: a second try on it is no extend, and opens nothing.
        await self.refused(ProtocolError, self.peer.extend(circuit, self.y))
        self.assertEqual(self.net.state(), before)

    @inline
    async def test_extend_to_directory_node_on_other_port_is_403(self):
        circuit = await self.peer.create(self.x)
        message = dumps({"to": f"{self.y.own_address.host}:5001", "relay": wire.b64encode(b"\x00" * 128)})
        await self.refused(Forbidden, self.peer.send(circuit, message))
        self.assertEqual(self.x.table.by_out, {})

    @inline
    async def test_extend_to_itself_is_403(self):
        before = self.net.state()
        circuit = await self.peer.create(self.x)
        await self.refused(Forbidden, self.peer.send(circuit, self.peer.extend_message(self.x, crypto.new_session_key())))
        self.assertClosedAfterFailedExtend(circuit, before)

    @inline
    async def test_extend_to_tracker_with_a_create_is_403(self):
        # R a string means "a node": the tracker is not one
        circuit = await self.peer.create(self.x)
        message = dumps({"to": str(TRACKER), "relay": wire.b64encode(b"\x00" * 128)})
        await self.refused(Forbidden, self.peer.send(circuit, message))
        self.assertEqual(self.net.tracker.received, [])

    @inline
    async def test_exit_to_non_tracker_is_403(self):
        for to in (self.y.own_address, wire.Address(STRANGER_IP, PORT), wire.Address(TRACKER_IP, 5001)):
            circuit = await self.peer.create(self.x)
            message = dumps({"to": str(to), "relay": {"type": "ls", "files": []}})
            e = await self.refused(Forbidden, self.peer.send(circuit, message))
            self.assertIn("exit policy", e.detail)
        self.assertEqual(self.x.table.by_out, {})
        self.assertEqual((len(self.x.table), self.net.stranger.received, len(self.y.table)), (0, [], 0))

    @inline
    async def test_exit_policy_at_third_hop_is_502_to_the_peer(self):
        before = self.net.state()
        circuit = await self.peer.build([self.x, self.y, self.z], connect=False)
        message = dumps({"to": str(self.w.own_address), "relay": {"type": "ls", "files": []}})
        await self.refused(NextHopFailed, self.peer.send(circuit, message))
        self.assertEqual(self.net.refusals[0], (self.z.own_address, 403))
        self.assertEqual(self.z.metrics.errors[403], 1)
        # Z closed its part and told Y, which told X, which told the peer.
        self.assertClosedAfterFailedExtend(circuit, before)
        self.assertEqual(self.w.table.by_in, {})

    @inline
    async def test_extend_while_one_is_in_progress_is_409(self):
        circuit = await self.peer.create(self.x)
        self.net.holding.add(self.y.own_address)
        first = defer.ensureDeferred(self.peer.extend(circuit, self.y))
        self.assertNoResult(first)
        self.assertTrue(self.circuit_at(self.x, circuit.cid).extending)
        e = await self.refused(Conflict, self.peer.send(circuit, self.peer.extend_message(self.z, crypto.new_session_key())))
        self.assertEqual(e.status, 409)
        # a plain message cannot overtake the extend either
        await self.refused(Conflict, self.peer.send(circuit, dumps({"type": "list"})))
        self.net.release()
        await first
        self.assertEqual(circuit.hops, [self.x, self.y])
        self.assertEqual(list(self.x.table.by_out.values()), [self.circuit_at(self.x, circuit.cid)])
        self.assertEqual([len(n.table) for n in self.net.nodes], [1, 1, 0, 0, 0])

    @inline
    async def test_second_extend_after_extend_goes_further(self):
        circuit = await self.peer.build([self.x, self.y], connect=False)
        await self.peer.extend(circuit, self.z)
        self.assertEqual([len(n.table) for n in self.net.nodes], [1, 1, 1, 0, 0])
        self.assertEqual(len(self.x.table.by_out), 1)

    @inline
    async def test_destroy_during_extend_leaves_nothing(self):
        circuit = await self.peer.create(self.x)
        self.net.holding.add(self.y.own_address)
        first = defer.ensureDeferred(self.peer.extend(circuit, self.y))
        await self.peer.destroy(circuit)
        self.net.release()
        await self.refused(Conflict, first)
        self.assertEqual((len(self.x.table), self.x.table.by_out), (0, {}))
        self.assertEqual(len(self.y.table), 0)  # the destroy was passed on to the new hop

    @inline
    async def test_destroy_during_connect_reaches_the_tracker(self):
        circuit = await self.peer.build([self.x, self.y], connect=False)
        self.net.holding.add(TRACKER)
        first = defer.ensureDeferred(self.peer.connect(circuit))
        await self.peer.destroy(circuit)
        self.net.release()
        await self.refused(NextHopFailed, first)  # Y answered 409 to X
        self.assertEqual(self.net.circuit_count(), 0)
        (exit_ip, cid, _), = self.net.tracker.received
        self.assertEqual(self.net.tracker.destroyed, [(exit_ip, cid)])


# --- teardown (§9) ---------------------------------------------------------------------


class DestroyTests(RelayTestCase):
    @inline
    async def test_destroy_from_peer_reaches_every_hop_and_the_tracker(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        self.assertEqual(await self.peer.destroy(circuit), b"{}")
        self.assertEqual(self.net.circuit_count(), 0)
        self.assertTrue(all(n.table.by_out == {} for n in self.net.nodes))
        self.assertEqual(self.net.tracker.destroyed, [(self.z.own_address.host, circuit.tracker_cid)])

    @inline
    async def test_destroy_from_tracker_travels_back_to_the_peer(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        answer = await self.z.handle(TRACKER_IP, cells.encode_destroy(circuit.tracker_cid))
        self.assertEqual(answer, b"{}")
        self.assertEqual(self.net.circuit_count(), 0)
        self.assertTrue(all(n.table.by_out == {} for n in self.net.nodes))
        (source, cell), = self.peer.received
        self.assertEqual((source, cell.cid, cell.destroy), (self.x.own_address.host, circuit.cid, True))
        self.assertEqual(self.net.tracker.destroyed, [])

    @inline
    async def test_destroy_from_the_middle_goes_both_ways(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        at_y = self.circuit_at(self.y, self.circuit_at(self.x, circuit.cid).out_cid)
        self.net.clock.advance(601)  # Y expires the circuit and tells both neighbours, as the service does
        expired = self.y.table.expire()
        self.assertEqual(expired, [at_y])
        for c in expired:
            self.y.destroy_both_ways(c)
        self.assertEqual(self.net.circuit_count(), 0)
        self.assertEqual(len(self.net.tracker.destroyed), 1)
        self.assertEqual([c.cid for _, c in self.peer.received if c.destroy], [circuit.cid])

    @inline
    async def test_destroy_of_unknown_cid_is_404(self):
        await self.peer.build([self.x, self.y, self.z])
        before = self.net.state()
        e = await self.refused(UnknownCircuit, self.x.handle(self.peer.ip, cells.encode_destroy(wire.new_circuit_id())))
        self.assertEqual((e.status, e.error), (404, "unknown_circuit"))
        self.assertEqual(self.net.state(), before)

    @inline
    async def test_destroy_twice_is_404(self):
        circuit = await self.peer.build([self.x])
        await self.peer.destroy(circuit)
        await self.refused(UnknownCircuit, self.peer.destroy(circuit))

    @inline
    async def test_destroy_with_unreachable_neighbour_still_answers(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        self.net.down.add(self.y.own_address)
        self.assertEqual(await self.peer.destroy(circuit), b"{}")
        self.assertEqual(len(self.x.table), 0)
        self.assertEqual((len(self.y.table), len(self.z.table)), (1, 1))  # left to idle expiry

    @inline
    async def test_cid_is_unknown_after_destroy(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        body = self.peer.cell(circuit, dumps({"type": "list"}))
        await self.peer.destroy(circuit)
        count = len(self.net.tracker.received)
        # an unknown CID is a CREATE: this onion is not an RSA ciphertext of X's key
        await self.refused(BadRequest, self.x.handle(self.peer.ip, body))
        self.assertEqual((len(self.x.table), len(self.net.tracker.received)), (0, count))


# --- bridges (§7, §8) -------------------------------------------------------------------


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


class BridgeTests(BridgeTestCase):
    def test_control_messages_create_both_ends(self):
        self.assertIn(self.bridge_cid, self.z.table.bridges_in)
        self.assertIn(self.bridge_cid, self.w.table.bridges_out)
        self.assertEqual(self.net.bridge_count(), 2)

    @inline
    async def test_file_chunk_crosses_the_bridge_to_the_requester(self):
        count = len(self.net.tracker.received)
        chunk = self.chunk()
        answer = await self.sharer.send(self.s, dumps(chunk))
        self.assertEqual(answer, b"{}")
        self.assertEqual(self.requester.backward(self.r), [chunk])
        self.assertEqual(len(self.net.tracker.received), count)  # the tracker never saw it

    @inline
    async def test_chunks_arrive_in_order(self):
        chunks = [self.chunk(i, bytes([i]) * 100) for i in range(5)]
        for chunk in chunks:
            await self.sharer.send(self.s, dumps(chunk))
        self.assertEqual(self.requester.backward(self.r), chunks)

    @inline
    async def test_full_size_chunk_crosses_the_bridge(self):
        chunk = self.chunk(data=bytes(range(256)) * 1024)
        await self.sharer.send(self.s, dumps(chunk))
        self.assertEqual(self.requester.backward(self.r), [chunk])

    @inline
    async def test_transfer_end_removes_both_bridge_ends(self):
        await self.sharer.send(self.s, dumps(self.chunk()))
        await self.sharer.send(self.s, dumps(self.end()))
        self.assertEqual(self.requester.backward(self.r), [self.chunk(), self.end()])
        self.assertEqual((self.z.table.bridge_count, self.w.table.bridge_count), (0, 0))
        # afterwards a chunk of that transfer goes to the tracker, which answers an error
        reply = await self.sharer.request(self.s, self.chunk(1))
        self.assertEqual(reply["type"], "error")
        self.assertEqual(self.net.tracker.received[-1], (self.w.own_address.host, self.s.tracker_cid, self.chunk(1)))
        self.assertEqual(len(self.requester.backward(self.r)), 2)

    @inline
    async def test_other_transfer_goes_to_the_tracker(self):
        reply = await self.sharer.request(self.s, self.chunk(transfer="other"))
        self.assertEqual(reply["type"], "error")
        self.assertEqual(self.requester.received, [])
        self.assertEqual(self.net.bridge_count(), 2)

    @inline
    async def test_other_messages_of_the_sharer_go_to_the_tracker(self):
        self.assertEqual(await self.sharer.request(self.s, {"type": "list", "transfer": self.transfer}), FILES_REPLY)
        self.assertEqual(self.requester.received, [])

    @inline
    async def test_requester_circuit_has_no_outgoing_bridge(self):
        reply = await self.requester.request(self.r, self.chunk())
        self.assertEqual(reply["type"], "error")
        self.assertEqual(self.net.tracker.received[-1][:2], (self.z.own_address.host, self.r.tracker_cid))

    @inline
    async def test_bridge_cid_from_other_ip_is_403(self):
        body = cells.encode_cell(self.bridge_cid, self.chunk())
        for ip in (STRANGER_IP, TRACKER_IP, self.y.own_address.host):
            await self.refused(Forbidden, self.z.handle(ip, body))
        self.assertEqual(self.requester.received, [])
        self.assertEqual(self.net.bridge_count(), 2)

    @inline
    async def test_bridge_cell_must_carry_an_object(self):
        body = cells.encode_cell(self.bridge_cid, b"\x00" * 40)
        await self.refused(BadRequest, self.z.handle(self.w.own_address.host, body))
        self.assertEqual(self.requester.received, [])

    @inline
    async def test_drop_bridge_forgets_each_end(self):
        drop = {"type": "drop_bridge", "issued": self.net.clock.seconds(), "bridge_CID": self.bridge_cid}
        self.assertEqual(await self.net.control(self.z, drop), b"{}")
        self.assertEqual(await self.net.control(self.w, drop), b"{}")
        self.assertEqual(self.net.bridge_count(), 0)
        await self.refused(Conflict, self.net.control(self.w, drop))  # the same signed body again
        await self.refused(UnknownCircuit, self.net.control(self.w, dict(drop, issued=drop["issued"] + 1)))
        reply = await self.sharer.request(self.s, self.chunk())
        self.assertEqual(reply["type"], "error")
        self.assertEqual(self.requester.received, [])

    @inline
    async def test_receive_bridge_replayed_after_drop_under_any_spelling_of_its_signature_is_refused(self):
        # The receive_bridge that made Z's end, captured and replayed after drop_bridge:
        # under its own signature text, and under each other base64 spelling of the
        # same 64 bytes (the low bits of the last digit before the padding are unused).
        bridge_cid = wire.new_circuit_id()
        payload = self.receive_bridge(self.r, self.s, bridge_cid)
        body, signature = control.sign_control(TRACKER_KEY, payload)
        self.assertEqual(await self.z.handle(TRACKER_IP, body, signature), b"{}")
        drop = {"type": "drop_bridge", "issued": self.net.clock.seconds(), "bridge_CID": bridge_cid}
        await self.net.control(self.z, drop)
        self.assertNotIn(bridge_cid, self.z.table.bridges_in)
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        base = alphabet.index(signature[-3]) & ~0x0F
        spellings = [signature[:-3] + alphabet[base | low] + "==" for low in range(16)]
        self.assertIn(signature, spellings)
        for spelling in spellings:
            e = await self.refused(ProtocolError, self.z.handle(TRACKER_IP, body, spelling))
            self.assertIn(e.status, (403, 409), spelling)
            self.assertNotIn(bridge_cid, self.z.table.bridges_in, spelling)

    @inline
    async def test_bridge_dies_with_its_circuit(self):
        await self.sharer.destroy(self.s)
        self.assertEqual(self.w.table.bridge_count, 0)
        await self.z.handle(TRACKER_IP, cells.encode_destroy(self.r.tracker_cid))
        self.assertEqual(self.z.table.bridge_count, 0)
        self.assertEqual(self.net.circuit_count(), 0)

    @inline
    async def test_bridge_idle_expiry(self):
        self.net.clock.advance(300)
        await self.sharer.send(self.s, dumps(self.chunk()))
        self.net.clock.advance(300.5)
        for node in self.net.nodes:
            node.table.expire()
        self.assertEqual(self.net.bridge_count(), 2)
        self.net.clock.advance(300)
        for node in (self.z, self.w):
            node.table.expire()
        self.assertEqual(self.net.bridge_count(), 0)

    @inline
    async def test_requester_exit_down_is_bridge_gone_for_the_sharer(self):
        # The sharer's circuit is fine; only the bridge is gone: the exit says
        # so in a reply and drops its end, rather than failing the circuit.
        self.net.down.add(self.z.own_address)
        reply = await self.sharer.request(self.s, self.chunk())
        self.assertEqual((reply["type"], reply["error"]), ("error", "bridge_gone"))
        self.assertEqual(self.w.table.bridge_count, 0)
        self.assertEqual(self.z.table.bridge_count, 1)

    @inline
    async def test_deeply_nested_chunk_is_refused_at_the_exit(self):
        # JSON a node can parse but not re-encode must not reach the bridge
        body = dumps(self.chunk())[:-1] + b',"deep":' + b"[" * 300 + b"]" * 300 + b"}"
        before = self.net.state()
        await self.refused(NextHopFailed, self.sharer.send(self.s, body))
        self.assertEqual(self.net.refusals[0], (self.w.own_address, 400))
        self.assertEqual(self.requester.received, [])
        self.assertEqual(self.net.state(), before)


class BridgeControlTests(BridgeTestCase):
    """Refused control messages create no bridge (§7)."""

    def setUp(self):
        d = super().setUp()
        d.addCallback(lambda _: self._snapshot())
        return d

    def _snapshot(self):
        self.before = self.net.state()
        self.new_bridge = wire.new_circuit_id()

    async def check_refused(self, exc_type, node, payload, **kw):
        e = await self.refused(exc_type, self.net.control(node, payload, **kw))
        self.assertEqual(self.net.state(), self.before)
        return e

    @inline
    async def test_bad_signature_is_403(self):
        bridge_cid = wire.new_circuit_id()
        payload = self.receive_bridge(self.r, self.s, bridge_cid)
        e = await self.check_refused(Forbidden, self.z, payload, key=FORGER_KEY)
        self.assertEqual(e.status, 403)
        await self.check_refused(Forbidden, self.z, payload, signature="")
        await self.check_refused(Forbidden, self.z, payload, signature="not base64")
        _, other_signature = control.sign_control(TRACKER_KEY, self.receive_bridge(self.r, self.s, wire.new_circuit_id()))
        await self.check_refused(Forbidden, self.z, payload, signature=other_signature)

    @inline
    async def test_stale_issued_is_403(self):
        now = self.net.clock.seconds()
        for issued in (now - 61, now + 61):
            e = await self.check_refused(Forbidden, self.w, self.make_bridge(self.r, self.s, self.new_bridge, "t-2",
                                                                            issued=issued))
            self.assertIn("stale", e.detail)

    @inline
    async def test_issued_59_s_ago_is_accepted(self):
        payload = self.make_bridge(self.r, self.s, self.new_bridge, "t-2", issued=self.net.clock.seconds() - 59)
        self.assertEqual(await self.net.control(self.w, payload), b"{}")
        self.assertIn(self.new_bridge, self.w.table.bridges_out)

    @inline
    async def test_node_without_tracker_key_refuses(self):
        self.net.directory.key = None
        await self.check_refused(Forbidden, self.z, self.receive_bridge(self.r, self.s, self.new_bridge))

    @inline
    async def test_bridge_for_unknown_circuit_is_404(self):
        await self.check_refused(UnknownCircuit, self.z, self.receive_bridge(self.r, self.s, self.new_bridge,
                                                                             CID=wire.new_circuit_id()))
        # not an exit of that circuit: X's OutCID of R is a node link
        at_x = self.circuit_at(self.x, self.r.cid)
        await self.check_refused(UnknownCircuit, self.x, self.receive_bridge(self.r, self.s, self.new_bridge,
                                                                             CID=at_x.out_cid))

    @inline
    async def test_duplicate_bridge_cid_is_409(self):
        await self.check_refused(Conflict, self.z, self.receive_bridge(self.r, self.s, self.bridge_cid))

    @inline
    async def test_malformed_control_is_400(self):
        for payload in ({"type": "receive_bridge"},
                        self.receive_bridge(self.r, self.s, self.new_bridge, type="open_proxy"),
                        self.receive_bridge(self.r, self.s, "not-a-uuid"),
                        self.receive_bridge(self.r, self.s, self.new_bridge, **{"from": "bad address!"}),
                        self.make_bridge(self.r, self.s, self.new_bridge, ""),
                        self.receive_bridge(self.r, self.s, self.new_bridge, issued="now")):
            await self.check_refused(BadRequest, self.z, payload)


class SameExitTests(BridgeTestCase):
    """§7: "Both exits may be the same node." R = X, Y, Z and S = Y, X, Z."""

    sharer_exit = "z"

    @inline
    async def test_chunks_cross_a_bridge_inside_one_node(self):
        self.assertEqual(self.z.table.bridge_count, 2)
        await self.sharer.send(self.s, dumps(self.chunk()))
        await self.sharer.send(self.s, dumps(self.end()))
        self.assertEqual(self.requester.backward(self.r), [self.chunk(), self.end()])
        self.assertEqual(self.z.table.bridge_count, 0)
        self.assertEqual(len(self.net.tracker.received), 2)  # the two ls only

    @inline
    async def test_drop_bridge_drops_both_ends(self):
        drop = {"type": "drop_bridge", "issued": self.net.clock.seconds(), "bridge_CID": self.bridge_cid}
        await self.net.control(self.z, drop)
        self.assertEqual(self.z.table.bridge_count, 0)


# --- malformed input, rate limits, failing next hops -------------------------------------------


class MalformedTests(BridgeTestCase):
    """Every refused message leaves every table as it was (§3)."""

    def setUp(self):
        d = super().setUp()
        d.addCallback(lambda _: defer.ensureDeferred(self._fresh()))
        return d

    async def _fresh(self):
        self.fresh = await self.requester.create(self.v)  # a one-hop circuit, not extended yet

    async def check(self, label, status, node, source_ip, body, signature=None):
        before = self.net.state()
        received = (len(self.net.tracker.received), len(self.requester.received), len(self.sharer.received))
        try:
            answer = await node.handle(source_ip, body, signature)
        except ProtocolError as e:
            self.assertEqual(e.status, status, f"{label}: {e.status} {e.detail}")
            self.assertTrue(e.detail, label)
        else:
            self.fail(f"{label}: accepted with {answer!r}")
        self.assertEqual(self.net.state(), before, label)
        self.assertEqual((len(self.net.tracker.received), len(self.requester.received),
                          len(self.sharer.received)), received, label)

    @inline
    async def test_malformed_cells(self):
        x, peer = self.x, self.requester.ip
        for label, body in [
            ("empty", b""), ("not json", b"GET / HTTP/1.1"), ("array", b"[]"), ("invalid utf-8", b'{"CID":"\xff"}'),
            ("no CID", dumps({"payload": "AAAA"})), ("CID number", dumps({"CID": 1, "payload": "AAAA"})),
            ("CID uppercase", dumps({"CID": self.r.cid.upper(), "payload": "AAAA"})),
            ("CID v1", dumps({"CID": "35ce8f75-6b57-1824-8597-dd756c75a9c5", "payload": "AAAA"})),
            ("no payload", dumps({"CID": self.r.cid})), ("payload list", dumps({"CID": self.r.cid, "payload": [1]})),
            ("destroy 1", dumps({"CID": self.r.cid, "destroy": 1})),
            ("destroy with payload", dumps({"CID": self.r.cid, "destroy": True, "payload": "AAAA"})),
            ("destroy control", dumps({"CID": "control", "destroy": True})),
            ("deep", b'{"CID":"' + self.r.cid.encode() + b'","payload":' + b"[" * 200 + b"]" * 200 + b"}"),
        ]:
            await self.check(label, 400, x, peer, body)

    @inline
    async def test_malformed_creates(self):
        x, peer = self.x, self.requester.ip
        new = wire.new_circuit_id
        for label, body in [
            ("bad base64", dumps({"CID": new(), "payload": "not base64!"})),
            ("garbage ciphertext", cells.encode_cell(new(), b"\x01" * 128)),
            ("short ciphertext", cells.encode_cell(new(), b"\x01" * 16)),
            ("sealed for another node", cells.encode_cell(new(), crypto.seal_session_key(
                self.y.private_key.public_key(), crypto.new_session_key()))),
            ("32-byte key", cells.encode_cell(new(), crypto.seal_session_key(
                x.private_key.public_key(), b"k" * 32))),
        ]:
            await self.check(label, 400, x, peer, body)

    @inline
    async def test_object_payload_on_an_unknown_cid_is_404(self):
        # Objects come only from the tracker or over a bridge: a gone circuit or bridge.
        body = dumps({"CID": wire.new_circuit_id(), "payload": {"type": "file_chunk"}})
        await self.check("object payload", 404, self.x, self.requester.ip, body)

    @inline
    async def test_malformed_forward_layers(self):
        x, peer = self.x, self.requester.ip
        good = crypto.wrap_onion(self.r.layers, dumps({"type": "list"}))
        tampered = bytearray(good)
        tampered[20] ^= 1
        for label, payload in [
            ("tampered", bytes(tampered)), ("too short", good[:27]), ("empty", b""),
            ("backward layer", self.r.layers[0].wrap(b"{}", crypto.BACKWARD)),
            ("other key", crypto.Layer(crypto.new_session_key()).wrap(b"{}", crypto.FORWARD)),
        ]:
            await self.check(label, 400, x, peer, cells.encode_cell(self.r.cid, payload))
        await self.check("object on a node link", 400, x, peer, cells.encode_cell(self.r.cid, {"type": "list"}))
        await self.check("bad base64", 400, x, peer, dumps({"CID": self.r.cid, "payload": "%%%"}))

    @inline
    async def test_malformed_inside_the_onion_is_502_at_the_entry(self):
        x, peer = self.x, self.requester.ip
        one_layer = self.r.layers[:1]  # X's layer is fine, Y cannot peel what is inside
        await self.check("garbage for Y", 502, x, peer,
                         cells.encode_cell(self.r.cid, crypto.wrap_onion(one_layer, b"\x00" * 64)))
        for label, message in [("not json", b"not json"), ("array", b"[1,2]"), ("string", b'"ls"'),
                               ("deep", b'{"type":"x","d":' + b"[" * 200 + b"]" * 200 + b"}")]:
            await self.check(label, 502, x, peer, self.requester.cell(self.r, message))

    @inline
    async def test_malformed_extends_are_400_and_close_the_circuit(self):
        v, peer = self.v, self.requester.ip
        y = str(self.y.own_address)
        for label, message in [
            ("not json", b"\x00garbage"), ("array", b'["to","relay"]'),
            ("no to", dumps({"relay": "AAAA"})), ("no relay", dumps({"to": y})),
            ("bad address", dumps({"to": "127.0.0.12:0", "relay": "AAAA"})),
            ("address number", dumps({"to": 12, "relay": "AAAA"})),
            ("relay bad base64", dumps({"to": y, "relay": "%%"})),
            ("relay number", dumps({"to": y, "relay": 5})), ("relay null", dumps({"to": y, "relay": None})),
        ]:
            before = self.net.state()
            fresh = await self.requester.create(v)
            sent = len(self.net.log)
            e = await self.refused(BadRequest, v.handle(peer, self.requester.cell(fresh, message)))
            self.assertEqual(e.status, 400, label)
            self.assertEqual(self.net.state(), before, label)  # the circuit is gone, nothing else changed
            # V told the requester its circuit is closed, and sent nothing else anywhere.
            self.assertEqual([(a, body) for _, a, body in self.net.log[sent:]],
                             [(self.requester.address, cells.encode_destroy(fresh.cid))], label)

    @inline
    async def test_malformed_from_the_tracker_and_over_bridges(self):
        z = self.z
        await self.check("base64 from the tracker", 400, z, TRACKER_IP,
                         cells.encode_cell(self.r.tracker_cid, b"\x00" * 40))
        await self.check("bridge base64", 400, z, self.w.own_address.host,
                         cells.encode_cell(self.bridge_cid, b"\x00" * 40))
        body, signature = control.sign_control(TRACKER_KEY, {"type": "make_bridge"})
        await self.check("control missing fields", 400, z, TRACKER_IP, body, signature)
        await self.check("control payload string", 400, z, TRACKER_IP,
                         dumps({"CID": "control", "payload": "AAAA"}),
                         crypto.sign_body(TRACKER_KEY, dumps({"CID": "control", "payload": "AAAA"})))
        await self.check("control unsigned", 403, z, TRACKER_IP,
                         control.sign_control(TRACKER_KEY, self.receive_bridge(self.r, self.s, wire.new_circuit_id()))[0])

    @inline
    async def test_circuit_works_after_malformed_traffic(self):
        await self.check("tampered", 400, self.x, self.requester.ip, cells.encode_cell(self.r.cid, b"\x00" * 60))
        self.assertEqual(await self.requester.request(self.r, {"type": "list"}), FILES_REPLY)


class RateLimitTests(RelayTestCase):
    def setUp(self):
        super().setUp()
        self.net = Network(burst=3)
        self.peer, self.peer2 = self.net.peers
        self.x = self.net.nodes[0]

    async def create_at_x(self, times: int):
        """``times`` CREATEs from the first peer at X."""
        for _ in range(times):
            await self.peer.create(self.x)

    @inline
    async def test_429_after_the_create_burst(self):
        await self.create_at_x(3)
        before = self.net.state()
        e = await self.refused(RateLimited, self.peer.create(self.x))
        self.assertEqual((e.status, e.error), (429, "rate_limited"))
        self.assertEqual(self.net.state(), before)
        self.assertEqual(len(self.x.table), 3)

    @inline
    async def test_limit_is_per_source_ip(self):
        await self.create_at_x(3)
        await self.refused(RateLimited, self.peer.create(self.x))
        await self.peer2.create(self.x)
        self.assertEqual(len(self.x.table), 4)

    @inline
    async def test_tokens_come_back_with_time(self):
        await self.create_at_x(3)
        await self.refused(RateLimited, self.peer.create(self.x))
        self.net.clock.advance(1)
        await self.peer.create(self.x)
        await self.refused(RateLimited, self.peer.create(self.x))

    @inline
    async def test_traffic_on_existing_circuits_is_not_limited(self):
        circuit = await self.peer.build([self.x], connect=True)
        await self.create_at_x(2)
        await self.refused(RateLimited, self.peer.create(self.x))
        for _ in range(10):
            self.assertEqual(await self.peer.request(circuit, {"type": "list"}), FILES_REPLY)


class NextHopTests(RelayTestCase):
    @inline
    async def test_next_hop_down_is_502_and_closes_the_circuit(self):
        before = self.net.state()
        circuit = await self.peer.create(self.x)
        self.net.down.add(self.y.own_address)
        e = await self.refused(NextHopFailed, self.peer.extend(circuit, self.y))
        self.assertEqual((e.status, e.error), (502, "next_hop_failed"))
        self.assertClosedAfterFailedExtend(circuit, before)
        self.assertEqual(self.x.metrics.extends_failed_total, 1)
        self.net.down.clear()
        fresh = await self.peer.create(self.x)  # a new circuit extends as usual
        await self.peer.extend(fresh, self.y)
        self.assertEqual(len(self.x.table.by_out), 1)

    @inline
    async def test_next_hop_refusing_is_502_and_closes_the_circuit(self):
        before = self.net.state()
        circuit = await self.peer.create(self.x)
        # the CREATE for Y is sealed with Z's key: Y answers 400
        await self.refused(NextHopFailed, self.peer.extend(circuit, self.y, sealed_for=self.z))
        self.assertEqual(self.net.refusals, [(self.y.own_address, 400)])
        self.assertClosedAfterFailedExtend(circuit, before)

    @inline
    async def test_next_hop_timeout_is_504_and_closes_the_circuit(self):
        before = self.net.state()
        circuit = await self.peer.create(self.x)
        self.net.slow.add(self.y.own_address)
        e = await self.refused(NextHopTimeout, self.peer.extend(circuit, self.y))
        self.assertEqual(e.status, 504)
        self.assertClosedAfterFailedExtend(circuit, before)

    @inline
    async def test_tracker_down_at_connect_is_502_and_closes_the_circuit(self):
        before = self.net.state()
        circuit = await self.peer.build([self.x, self.y, self.z], connect=False)
        self.net.down.add(TRACKER)
        await self.refused(NextHopFailed, self.peer.connect(circuit))
        self.assertClosedAfterFailedExtend(circuit, before)
        self.net.down.clear()
        fresh = await self.peer.build([self.x, self.y, self.z], connect=False)
        self.assertEqual(await self.peer.connect(fresh), FILES_REPLY)

    @inline
    async def test_next_hop_failing_on_an_open_circuit_is_502(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        self.net.down.add(self.z.own_address)
        before = self.net.state()
        await self.refused(NextHopFailed, self.peer.request(circuit, {"type": "list"}))
        self.assertEqual(self.net.refusals, [(self.y.own_address, 502)])
        self.assertEqual(self.net.state(), before)

    @inline
    async def test_malformed_reply_from_next_hop_is_502(self):
        liar = wire.Address(STRANGER_IP, PORT)
        self.net.directory.addresses.add(liar)
        message = dumps({"to": str(liar), "relay": wire.b64encode(b"\x00" * 128)})
        before = self.net.state()
        for answer in (b"not json", b"[]", b'{"payload":5}', b'{"payload":"%%"}', b'{"payload":{"type":"created"}}'):
            self.net.stranger.answer = answer
            circuit = await self.peer.create(self.x)
            e = await self.refused(NextHopFailed, self.peer.send(circuit, message))
            self.assertIn("next hop", e.detail)
            self.assertEqual(self.net.state(), before)  # each failed extend closed its circuit

    @inline
    async def test_unreachable_peer_makes_backward_message_502(self):
        circuit = await self.peer.build([self.x, self.y, self.z])
        self.net.down.add(self.peer.address)
        await self.refused(NextHopFailed, self.net.from_tracker(self.z, circuit.tracker_cid, {"type": "ping"}))
        self.assertEqual(self.net.circuit_count(), 3)


# --- relay failures in the node's log (issue 12) ---------------------------------------


class RelayFailureLogTests(BridgeTestCase):
    """A hop that fails is named in the node's log, in safe form: what failed and why,
    never a circuit id nor an address (only with unsafe_logging).

    ``closing`` holds addresses whose POSTs fail as HTTPOutbound says when a
    neighbour closed the connection; other refusals are worded as HTTPOutbound
    words them (the status, never the address, unlike this module's Network).
    """

    def setUp(self):
        self.events: list[dict] = []
        self.closing: set = set()
        built = super().setUp()
        for node in self.net.nodes:
            node.log = Logger(namespace="onion_twisted.node.relay.NodeRelay", observer=self.events.append)
        network_post = self.net.post

        def post(sender_ip, address, body, headers=None, path="/"):
            if address in self.closing:
                return defer.fail(NextHopFailed("next hop closed the connection"))

            def reworded(failure):
                failure.trap(NextHopFailed)
                raise NextHopFailed(f"next hop answered {self.net.refusals[-1][1]}")
            return network_post(sender_ip, address, body, headers, path).addErrback(reworded)

        self.net.post = post
        return built

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.warn]

    def assertSafe(self, lines):
        secrets = {self.r.cid, self.s.cid, self.r.tracker_cid, self.s.tracker_cid, self.bridge_cid, "127.0.0."}
        for node in self.net.nodes:
            for circuit in node.table.by_in.values():
                secrets |= {circuit.in_cid, circuit.out_cid}
        for line in lines:
            for secret in secrets - {None}:
                self.assertNotIn(secret, line)

    @inline
    async def test_a_backward_cell_the_peer_does_not_take_is_logged_at_each_hop(self):
        self.closing.add(self.requester.address)
        reply = await self.sharer.request(self.s, self.chunk())
        self.assertEqual(reply["error"], "bridge_gone")
        lines = self.lines()
        self.assertEqual(lines, [
            "a backward cell could not be delivered to the previous hop: next hop closed the connection",  # X
            "a backward cell could not be delivered to the previous hop: next hop answered 502",           # Y
            "a backward cell could not be delivered to the previous hop: next hop answered 502",           # Z
            "a chunk could not cross the bridge: next hop answered 502",                                   # W
        ])
        self.assertSafe(lines)

    @inline
    async def test_a_chunk_the_other_exit_does_not_take_is_logged(self):
        self.closing.add(self.z.own_address)
        reply = await self.sharer.request(self.s, self.chunk())
        self.assertEqual(reply["error"], "bridge_gone")
        self.assertEqual(self.lines(), ["a chunk could not cross the bridge: next hop closed the connection"])
        self.assertSafe(self.lines())

    @inline
    async def test_forward_and_tracker_failures_are_logged(self):
        self.closing.add(TRACKER)
        await self.refused(NextHopFailed, self.sharer.request(self.s, {"type": "list"}))
        self.assertEqual(self.lines(), [
            "a message could not be delivered to the tracker: next hop closed the connection",   # W
            "a forward cell could not be delivered to the next hop: next hop answered 502",      # X
            "a forward cell could not be delivered to the next hop: next hop answered 502",      # Y
        ])
        self.assertSafe(self.lines())

    @inline
    async def test_an_extend_that_fails_is_logged(self):
        circuit = await self.peer.create(self.v)
        self.closing.add(self.w.own_address)
        await self.refused(NextHopFailed, self.peer.extend(circuit, self.w))
        self.assertEqual(self.lines(),
                         ["a circuit could not be extended to the next hop: next hop closed the connection"])
        self.assertSafe(self.lines())

    @inline
    async def test_one_line_a_second_per_kind_with_the_count_of_the_others(self):
        self.closing.add(self.z.own_address)
        for i in range(5):  # each fails and drops the bridge: made again for the next
            bridge_cid = wire.new_circuit_id()
            await self.bridge(self.r, self.s, bridge_cid, f"t{i}")
            await self.sharer.request(self.s, self.chunk(transfer=f"t{i}"))
        self.assertEqual(len(self.lines()), 1)
        self.net.clock.advance(1)
        await self.bridge(self.r, self.s, wire.new_circuit_id(), "t5")
        await self.sharer.request(self.s, self.chunk(transfer="t5"))
        self.assertEqual(self.lines()[1], "a chunk could not cross the bridge: next hop closed the connection"
                                          " (4 more since the last such line)")

    @inline
    async def test_unsafe_logging_names_the_circuit(self):
        self.w.unsafe_logging = True
        self.closing.add(self.z.own_address)
        await self.sharer.request(self.s, self.chunk())
        (line,) = self.lines()
        self.assertIn("a chunk could not cross the bridge: next hop closed the connection", line)
        self.assertIn(self.circuit_at(self.w, self.w_in_cid()).in_cid, line)
        self.assertIn(str(self.z.own_address), line)

    def w_in_cid(self) -> str:
        (cid,) = [c.in_cid for c in self.w.table.by_in.values() if c.out_kind == EXIT]
        return cid
