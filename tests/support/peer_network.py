"""A whole onion network in memory, for tests of ``Peer`` (PROTOCOL.md §3 - §9).

One ``task.Clock``; a real ``Tracker`` (Catalogue, NodeRegistry, its own
Ed25519 key) at 127.0.0.1; four real ``NodeRelay`` instances at
127.0.0.11 .. 127.0.0.14; two real ``Peer`` instances, alice (127.0.0.101)
and bob (127.0.0.102), each over its own temporary data, share and
downloads directories. No socket, no thread, no global reactor.

Every member's outbound is a ``MemberOutbound`` (tests/support/in_memory.py) of the ``Network``:

* ``post(address, body, headers=None, path="/")`` calls the target's
  handler with the sender's IP as the source address (nodes:
  ``NodeRelay.handle``; tracker: ``handle_cell`` at ``/`` and
  ``register_node`` at ``/nodes``; peers: ``receive_cell``). A
  ``ProtocolError`` of the target becomes ``NextHopFailed`` with
  ``.answered`` set, as a real non-200 does; a member marked down refuses
  (``NextHopFailed`` without ``.answered``).
* ``get(address, path)`` answers ``(status, Headers, body)`` for
  ``/identity`` and ``/nodes`` of the tracker and of the nodes (a node
  mirrors the tracker's signed directory byte for byte).

Each delivery, and each reply, waits in a FIFO queue that ``pump`` runs one item at a time, so
a message crossing five members is five clock calls and never a deep
recursion; ``pump`` advances the clock until a condition holds. Everything
that crosses the network is recorded (``posts``, ``gets``,
``tracker_messages``) so tests can assert on what was sent.
"""

from __future__ import annotations

import collections
import os
import random
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from onion_twisted.protocol import cells, crypto, wire
from onion_twisted.tracker.catalogue import Catalogue
from onion_twisted.net.directory_client import DirectoryClient
from onion_twisted.peer.download_store import DownloadStore
from onion_twisted.protocol.errors import NextHopFailed, ProtocolError
from onion_twisted.peer.peer import CONNECTED, Peer
from onion_twisted.tracker.registry import NodeRegistry
from onion_twisted.node.relay import NodeRelay
from onion_twisted.peer.sharing import HashCache, ShareDirectory
from onion_twisted.tracker.tracker import Tracker
from onion_twisted.protocol.wire import SIGNATURE_HEADER
from tests.support.fakes import FakeDirectory
from tests.support.in_memory import InMemoryWorld, MemberOutbound

PORT = 5000
NOW = 1_700_000_000
TRACKER_IP = "127.0.0.1"
TRACKER = wire.Address(TRACKER_IP, PORT)
NODE_IPS = [f"127.0.0.{11 + i}" for i in range(4)]
NODE_ADDRESSES = [wire.Address(ip, PORT) for ip in NODE_IPS]
ALICE_IP, BOB_IP = "127.0.0.101", "127.0.0.102"
CHUNK = 16384
WINDOW = 4

# Generated once per module: RSA generation is the slow part of a network.
NODE_KEYS = [rsa.generate_private_key(public_exponent=65537, key_size=1024) for _ in NODE_IPS]
TRACKER_KEY = ed25519.Ed25519PrivateKey.generate()
TRACKER_KEY_B64 = crypto.tracker_public_b64(TRACKER_KEY)


def synchronous(f, *args, **kwargs) -> defer.Deferred:
    """``run_in_thread`` without a thread: hashing runs at once."""
    return defer.maybeDeferred(f, *args, **kwargs)



@dataclass
class Post:
    sender: str
    address: wire.Address
    path: str
    body: bytes
    headers: dict | None
    status: int | None = None   # None while under way; 200, a refusal's status, or 0 for "down"


@dataclass
class PeerDirs:
    data: str
    share: str
    downloads: str


class NodeDirectory(FakeDirectory):
    """A node's view of the directory: the tracker's registry and key, read directly.

    ``current`` stays None, so no CREATE is exempt from the rate limit.
    """

    def __init__(self, tracker: Tracker):
        super().__init__(None, TRACKER_KEY.public_key())
        self.tracker = tracker

    async def knows(self, address: wire.Address) -> bool:
        self.asked.append(address)
        return address in self.tracker.registry.nodes


class Network(InMemoryWorld):
    def __init__(self, base_dir: str, *, seed: int = 7, peer_options: dict | None = None,
                 tracker_sealed_hop: bool = True):
        super().__init__(NOW)
        self.base_dir = os.path.abspath(base_dir)
        self.seed = seed
        self.peer_options = dict(peer_options or {})
        self.down: set[str] = set()           # IPs that refuse every connection
        self.posts: list[Post] = []
        self.gets: list[tuple[str, wire.Address, str]] = []
        self.tracker_messages: list[tuple[str, str, dict]] = []  # (exit IP, CID, plaintext message)
        self.crashes: list[Failure] = []      # non-protocol exceptions of a handler (a 500)
        self.hold_replies_to: set[str] = set()  # sender IPs whose POST answers wait for release()
        self.held: list = []
        self.queue: collections.deque = collections.deque()  # deliveries and answers, in order
        self.delivered = 0

        self.tracker = Tracker(clock=self.clock, signing_key=TRACKER_KEY, own_address=TRACKER,
                               catalogue=Catalogue(self.clock, rng=random.Random(seed)),
                               registry=NodeRegistry(self.clock, TRACKER_KEY), outbound=MemberOutbound(self, TRACKER_IP),
                               sealed_hop=tracker_sealed_hop)
        self.nodes: dict[str, NodeRelay] = {}
        for ip, key, address in zip(NODE_IPS, NODE_KEYS, NODE_ADDRESSES):
            self.nodes[ip] = self.new_relay(key, address, TRACKER, NodeDirectory(self.tracker), rate=100.0,
                                            burst=10_000)
            public = key.public_key()
            self.tracker.registry.register(address, crypto.public_key_pem(public), crypto.fingerprint(public), ip)
        self.peers: dict[str, Peer] = {}      # IP -> the peer listening there now
        self.dirs: dict[str, PeerDirs] = {}
        self.alice = self.make_peer(ALICE_IP, "alice")
        self.bob = self.make_peer(BOB_IP, "bob")

    # --- members ---------------------------------------------------------------------------

    def make_peer(self, ip: str, name: str, **options) -> Peer:
        """A Peer at ``ip`` over ``<base>/<name>/{data,share,downloads}`` (kept across calls)."""
        dirs = self.dirs.get(ip)
        if dirs is None:
            root = os.path.join(self.base_dir, name)
            dirs = PeerDirs(os.path.join(root, "data"), os.path.join(root, "share"), os.path.join(root, "downloads"))
            for path in (dirs.data, dirs.share, dirs.downloads):
                os.makedirs(path, exist_ok=True)
            self.dirs[ip] = dirs
        outbound = MemberOutbound(self, ip)
        directory = DirectoryClient(self.clock, outbound, TRACKER, tracker_key=TRACKER_KEY_B64, default_port=PORT)
        share = ShareDirectory(dirs.share, HashCache(dirs.data), run_in_thread=synchronous)
        # One circuit for everything, never replaced, unless a test asks (issue 16's pool
        # and rotation have tests of their own): the tests count and follow that circuit.
        kwargs = dict(chunk_size=CHUNK, window=WINDOW, rng=random.Random(f"{self.seed}-{ip}-{len(self.posts)}"),
                      run_in_thread=synchronous, max_circuits=1, circuit_lifetime=0)
        kwargs.update(self.peer_options)
        kwargs.update(options)
        peer = Peer(clock=self.clock, outbound=outbound, directory=directory, tracker=TRACKER, share=share,
                    store=DownloadStore(dirs.downloads), data_dir=dirs.data, **kwargs)
        self.peers[ip] = peer
        return peer

    def share_path(self, peer_ip: str, name: str) -> str:
        return os.path.join(self.dirs[peer_ip].share, name)

    def downloads_dir(self, peer_ip: str) -> str:
        return self.dirs[peer_ip].downloads

    def write_share(self, peer_ip: str, name: str, data: bytes) -> str:
        path = self.share_path(peer_ip, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def node(self, address: wire.Address) -> NodeRelay:
        return self.nodes[address.ip]

    # --- POST and GET ------------------------------------------------------------------------

    def post(self, sender: str, address: wire.Address, body: bytes, headers=None, path="/") -> defer.Deferred:
        record = Post(sender, address, path, body, headers)
        self.posts.append(record)
        result = defer.Deferred()

        def deliver():
            if address.ip in self.down:
                record.status = 0
                self._answer(sender, result, Failure(NextHopFailed("next hop refused the connection")))
                return
            try:
                d = self._dispatch(sender, address, body, headers, path)
            except Exception:
                d = defer.fail()
            d.addCallbacks(lambda answer: self._answered(record, sender, result, answer),
                           lambda failure: self._refused(record, sender, result, failure))

        self.queue.append(deliver)
        return result

    def _dispatch(self, sender, address, body, headers, path) -> defer.Deferred:
        ip = address.ip
        if address.port != PORT:
            raise NextHopFailed("nobody listens on that port")
        if ip == TRACKER_IP:
            if path == "/nodes":
                return defer.ensureDeferred(self.tracker.register_node(sender, body))
            self._record_tracker_message(sender, body)
            return defer.ensureDeferred(self.tracker.handle_cell(sender, body))
        if ip in self.nodes:
            signature = (headers or {}).get(SIGNATURE_HEADER)
            return defer.ensureDeferred(self.nodes[ip].handle(sender, body, signature))
        if ip in self.peers:
            return defer.ensureDeferred(self.peers[ip].receive_cell(sender, body))
        raise NextHopFailed("nobody listens at that address")

    def _record_tracker_message(self, sender, body) -> None:
        try:
            cell = cells.parse_cell(body)
        except ProtocolError:
            return
        if isinstance(cell.payload, dict):
            self.tracker_messages.append((sender, cell.cid, cell.payload))

    def _answered(self, record, sender, result, answer) -> None:
        record.status = 200
        self._answer(sender, result, answer)

    def _refused(self, record, sender, result, failure) -> None:
        if failure.check(ProtocolError):
            error = NextHopFailed(f"next hop answered {failure.value.status} {failure.value.error}")
            error.answered = failure.value.status
            record.status = failure.value.status
        else:
            self.crashes.append(failure)  # a bug in a member: a real server answers 500
            error = NextHopFailed("next hop answered 500")
            error.answered = 500
            record.status = 500
        self._answer(sender, result, Failure(error))

    def _answer(self, sender, result, outcome) -> None:
        if sender in self.hold_replies_to:
            self.held.append((result, outcome))
            return

        def fire():
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)

        self.queue.append(fire)

    def release(self) -> None:
        """Deliver the answers held for ``hold_replies_to``, in order, and stop holding."""
        self.hold_replies_to.clear()
        held, self.held = self.held, []
        for result, outcome in held:
            self._answer(None, result, outcome)

    def get(self, sender: str, address: wire.Address, path: str) -> defer.Deferred:
        self.gets.append((sender, address, path))
        result = defer.Deferred()

        def deliver():
            if address.ip in self.down:
                result.errback(NextHopFailed("next hop refused the connection"))
            else:
                result.callback(self._get(address, path))

        self.queue.append(deliver)
        return result

    def _get(self, address: wire.Address, path: str):
        ip = address.ip
        if ip == TRACKER_IP:
            if path == "/identity":
                return 200, Headers(), wire.dumps({"role": "tracker", "address": str(TRACKER),
                                                   "public_key": TRACKER_KEY_B64,
                                                   "fingerprint": None, "protocol": "onion-http/1"})
        elif ip in self.nodes:
            if path == "/identity":
                public = self.nodes[ip].private_key.public_key()
                return 200, Headers(), wire.dumps({"role": "node", "address": str(address),
                                                   "public_key": crypto.public_key_pem(public),
                                                   "fingerprint": crypto.fingerprint(public),
                                                   "protocol": "onion-http/1"})
        else:
            return 404, Headers(), b'{"error":"not_found"}'
        if path == "/nodes":  # the tracker's directory, or a node's mirror of it: same bytes
            body, signature = self.tracker.registry.signed()
            return 200, Headers({SIGNATURE_HEADER: [signature]}), body
        return 404, Headers(), b'{"error":"not_found"}'

    # --- driving the clock ---------------------------------------------------------------------

    def pump(self, until=None, *, max_steps: int = 20_000, step: float = 0.5,
             max_deliveries: int = 2_000_000) -> None:
        """Deliver the queued messages one at a time, advancing the clock ``step`` seconds
        whenever none is queued, until ``until()`` holds (checked after every delivery).

        With no ``until``: deliver what is queued and run the calls due now, then return.
        AssertionError if the condition still does not hold after ``max_steps`` clock steps.
        """
        steps = deliveries = 0
        while True:
            if until is not None and until():
                return
            if self.queue:
                deliveries += 1
                if deliveries > max_deliveries:
                    raise AssertionError("the network never went quiet")
                self.delivered += 1
                self.queue.popleft()()
                continue
            if until is None:
                self.clock.advance(0)
                if not self.queue:
                    return
                continue
            if steps >= max_steps:
                raise AssertionError(f"the network did not reach the condition in {max_steps * step:.0f} s")
            steps += 1
            self.clock.advance(step)

    def run(self, d) -> defer.Deferred:
        """Pump until ``d`` (a Deferred or a coroutine) fired; the fired Deferred, to await."""
        if not isinstance(d, defer.Deferred):
            d = defer.ensureDeferred(d)
        fired = []
        d.addBoth(lambda r: (fired.append(True), r)[1])
        self.pump(until=lambda: bool(fired))
        return d

    async def start(self, *peers: Peer) -> None:
        """Start the peers and pump until each has a connected circuit."""
        for peer in peers or tuple(self.peers.values()):
            await self.run(peer.start())
        self.pump(until=lambda: all(p.circuit_state == CONNECTED for p in (peers or self.peers.values())))

    async def stop(self) -> None:
        for peer in list(self.peers.values()):
            if not peer._stopped:
                await self.run(peer.stop())
        self.pump()

    # --- looking at what happened --------------------------------------------------------------

    def tracker_key_of(self, peer: Peer):
        """(exit IP, CID) under which the tracker knows ``peer``'s current circuit, or None.

        Followed through the nodes' relay tables from the peer's entry node.
        """
        return None if peer.circuit is None else self.tracker_key_of_circuit(peer.circuit)

    def tracker_key_of_circuit(self, circuit):
        """(exit IP, CID) under which the tracker knows ``circuit``, or None."""
        ip, cid = circuit.entry.ip, circuit.cid
        for _ in range(10):
            node = self.nodes.get(ip)
            c = node.table.by_in.get(cid) if node is not None else None
            if c is None or c.out_cid is None:
                return None
            if c.out_kind == "exit":
                return (ip, c.out_cid)
            ip, cid = c.out_addr.ip, c.out_cid
        return None

    def messages_on(self, key, kind: str | None = None) -> list[dict]:
        """Plaintext messages the tracker received on the circuit it knows as ``key``."""
        return [m for ip, cid, m in self.tracker_messages
                if (ip, cid) == key and (kind is None or m.get("type") == kind)]

    def messages_of_type(self, kind: str) -> list[tuple[str, str, dict]]:
        return [(ip, cid, m) for ip, cid, m in self.tracker_messages if m.get("type") == kind]

    def tracker_gets(self, path: str = "/nodes") -> int:
        return sum(1 for _, address, p in self.gets if address == TRACKER and p == path)
