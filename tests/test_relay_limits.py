"""Budgets of CREATE work at a node, and the flood they stop (issue 12).

A CREATE costs the node one RSA decryption, whether or not it decrypts.
Three budgets are spent before that work: one per source IP that is not a
directory node (peers), one per directory node (each previous hop its own,
larger: it extends for many peers), and one for the whole node. And a
circuit whose EXTEND fails is closed at once, so a single circuit cannot
make its next hop decrypt again and again.
"""

from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer, task
from twisted.trial import unittest

from onion_twisted.protocol import cells, crypto, wire
from onion_twisted.node.circuits import RelayTable
from onion_twisted.protocol.errors import BadRequest, NextHopFailed, RateLimited
from onion_twisted.net.ratelimit import RateLimiter
from onion_twisted.node.relay import NodeRelay
from tests.support.deferreds import inline
from tests.support.fakes import FakeDirectory, listing

KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)
NEIGHBOUR_NODE_IP = "127.0.0.12"
OTHER_NODE_IP = "127.0.0.13"
PEER_IP = "127.0.0.50"


class CountingKey:
    """The node's private key, counting its RSA decryptions."""

    def __init__(self, key):
        self.key = key
        self.decryptions = 0

    def decrypt(self, *args):
        self.decryptions += 1
        return self.key.decrypt(*args)

    def public_key(self):
        return self.key.public_key()


def create_body(sealed=None):
    sealed = sealed or crypto.seal_session_key(KEY.public_key(), crypto.new_session_key())
    return cells.encode_cell(wire.new_circuit_id(), sealed)


class CreateBudgetTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.key = CountingKey(KEY)
        self.relay = NodeRelay(clock=self.clock, private_key=self.key, own_address=wire.Address("127.0.0.11", 5000),
                               tracker=wire.Address("127.0.0.1", 5000), table=RelayTable(self.clock),
                               outbound=None, directory=FakeDirectory(listing(
                                   wire.Address(ip, 5000) for ip in (NEIGHBOUR_NODE_IP, OTHER_NODE_IP))),
                               limiter=RateLimiter(self.clock, rate=1.0, burst=2),
                               node_limiter=RateLimiter(self.clock, rate=1.0, burst=5),
                               work_limiter=RateLimiter(self.clock, rate=1.0, burst=8, max_keys=1))

    async def creates(self, ip, n, body=create_body):
        """Send ``n`` CREATEs from ``ip``: how many were refused with 429."""
        refused = 0
        for _ in range(n):
            try:
                await self.relay.handle(ip, body())
            except RateLimited:
                refused += 1
        return refused

    @inline
    async def test_peer_past_its_burst_gets_429_and_no_circuit(self):
        self.assertEqual(await self.creates(PEER_IP, 3), 1)
        self.assertEqual(len(self.relay.table), 2)
        self.assertEqual(self.key.decryptions, 2)  # the refused one cost no RSA work

    @inline
    async def test_each_directory_node_has_its_own_budget(self):
        self.assertEqual(await self.creates(NEIGHBOUR_NODE_IP, 6), 1)  # node burst 5, not the peers' 2
        self.assertEqual(await self.creates(OTHER_NODE_IP, 1), 0)      # another node: its own budget
        self.assertEqual(await self.creates(PEER_IP, 1), 0)            # a peer: its own budget
        self.assertEqual(len(self.relay.table), 7)

    @inline
    async def test_the_node_has_one_budget_of_rsa_work_whoever_asks(self):
        # 2 + 5 + ... the work budget (8) runs out before the sources' own budgets do.
        await self.creates(PEER_IP, 2)
        await self.creates(NEIGHBOUR_NODE_IP, 5)
        self.assertEqual(await self.creates(OTHER_NODE_IP, 3), 2)
        self.assertEqual(self.key.decryptions, 8)
        e = self.assertFailure(defer.ensureDeferred(self.relay.handle("127.0.0.51", create_body())), RateLimited)
        self.assertIn("budget", (await e).detail)
        self.clock.advance(1)  # a second later, one more
        self.assertEqual(await self.creates("127.0.0.52", 2), 1)
        self.assertEqual(self.key.decryptions, 9)

    @inline
    async def test_creates_that_fail_to_decrypt_spend_the_budget_too(self):
        garbage = lambda: create_body(b"\x01" * 128)  # noqa: E731
        for _ in range(2):
            yield_ = defer.ensureDeferred(self.relay.handle(PEER_IP, garbage()))
            self.assertIsInstance(self.failureResultOf(yield_).value, BadRequest)
        self.assertEqual(await self.creates(PEER_IP, 1), 1)
        self.assertEqual(self.key.decryptions, 2)


class FloodThroughACircuitTests(unittest.TestCase):
    """One circuit through X, EXTENDs carrying garbage CREATEs for Y, again and again:
    before the fix every attempt cost Y an RSA decryption and the circuit stayed open."""

    @inline
    async def test_a_failed_extend_closes_the_circuit_so_one_circuit_costs_the_next_hop_one_decryption(self):
        from tests.support.relay_network import Network
        net = Network(burst=5)
        x, y = net.nodes[0], net.nodes[1]
        counting = y.private_key = CountingKey(y.private_key)
        peer = net.peers[0]
        circuit = await peer.create(x)
        garbage = wire.b64encode(b"\x01" * 128)
        extend = b'{"to":"' + str(y.own_address).encode() + b'","relay":"' + garbage.encode() + b'"}'
        answers = []
        for _ in range(50):
            try:
                await peer.send(circuit, extend)
                answers.append(200)
            except (NextHopFailed, BadRequest, RateLimited) as e:
                answers.append(e.status)
        self.assertEqual(counting.decryptions, 1)
        self.assertEqual(answers[0], 502)               # Y refused the CREATE; X closed the circuit
        self.assertEqual(len(x.table), 0)
        self.assertEqual(len(y.table), 0)
        # Every later cell on the closed circuit is a CREATE at X, under the peer's own
        # budget (burst 5, one already spent on the circuit): 400s, then 429s.
        self.assertEqual(answers[1:5], [400] * 4)
        self.assertEqual(set(answers[5:]), {429})
