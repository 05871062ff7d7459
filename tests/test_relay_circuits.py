"""Relay circuits in the in-memory network (tests/support/relay_network.py): build, and messages both
ways.
"""

from __future__ import annotations

from onion_twisted.protocol import cells, crypto, wire
from onion_twisted.node.circuits import EXIT, NODE
from onion_twisted.protocol.errors import BadRequest
from tests.support.deferreds import inline
from tests.support.relay_network import FILES_REPLY, RelayTestCase, TRACKER, dumps


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
