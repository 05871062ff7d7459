"""The per-IP budget of new circuits, and who is exempt from it."""

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer, task
from twisted.trial import unittest

from onion_twisted import cells, crypto, wire
from onion_twisted.circuits import RelayTable
from onion_twisted.directory import SignedDirectory
from onion_twisted.errors import RateLimited
from onion_twisted.ratelimit import RateLimiter
from onion_twisted.relay import NodeRelay

KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)
NEIGHBOUR_NODE_IP = "127.0.0.12"


class Directory:
    def __init__(self):
        address = wire.Address(NEIGHBOUR_NODE_IP, 5000)
        self.current = SignedDirectory(b"{}", "", 0, {address: None}, frozenset({NEIGHBOUR_NODE_IP}))

    async def knows(self, address):
        return address in self.current.nodes

    async def tracker_key(self):
        return None


def create_body():
    sealed = crypto.seal_session_key(KEY.public_key(), crypto.new_session_key())
    return cells.encode_cell(wire.new_circuit_id(), sealed)


class CreateBudgetTests(unittest.TestCase):
    def setUp(self):
        clock = task.Clock()
        self.relay = NodeRelay(clock=clock, private_key=KEY, own_address=wire.Address("127.0.0.11", 5000),
                               tracker=wire.Address("127.0.0.1", 5000), table=RelayTable(clock),
                               outbound=None, directory=Directory(),
                               limiter=RateLimiter(clock, rate=1.0, burst=2))

    @defer.inlineCallbacks
    def test_peer_past_its_burst_gets_429_and_no_circuit(self):
        for _ in range(2):
            yield defer.ensureDeferred(self.relay.handle("127.0.0.50", create_body()))
        with self.assertRaises(RateLimited):
            yield defer.ensureDeferred(self.relay.handle("127.0.0.50", create_body()))
        self.assertEqual(len(self.relay.table), 2)

    @defer.inlineCallbacks
    def test_directory_node_extending_for_many_peers_is_not_limited(self):
        for _ in range(10):
            yield defer.ensureDeferred(self.relay.handle(NEIGHBOUR_NODE_IP, create_body()))
        self.assertEqual(len(self.relay.table), 10)
