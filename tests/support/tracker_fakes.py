"""In-memory fakes for the tracker's tests (PROTOCOL.md §6, §7, §8, §9).

``TrackerOutbound`` (a ``tests.support.fakes.FakeOutbound``) stands for the
tracker's HTTP client: it records every POST (address, exact body bytes,
headers) and every GET, answers ``{}`` unless a test asked it to fail a kind
of message or to hold its Deferreds, and answers ``GET /identity`` from
``pages``, a table the test fills. ``TrackerHarness`` builds a
Tracker on a ``task.Clock`` with a seeded ``random.Random`` and nodes
already in its directory, and sends it cells as an exit node would.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass

import orjson
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet import defer, task

from onion_twisted.protocol import cells, crypto, wire
from onion_twisted.tracker.catalogue import Catalogue
from onion_twisted.tracker.registry import NodeRegistry
from onion_twisted.protocol.wire import SIGNATURE_HEADER
from onion_twisted.tracker.tracker import Tracker
from tests.support.fakes import FakeOutbound, Sent

PORT = 5000
NOW = 1_700_000_000
TRACKER_KEY = ed25519.Ed25519PrivateKey.generate()
OTHER_TRACKER_KEY = ed25519.Ed25519PrivateKey.generate()
TRACKER_IP = "127.0.0.1"
TRACKER_ADDRESS = wire.Address(TRACKER_IP, PORT)
NODE_KEYS = [rsa.generate_private_key(public_exponent=65537, key_size=1024) for _ in range(4)]
NODE_IPS = [f"127.0.0.{11 + i}" for i in range(len(NODE_KEYS))]
NODE_ADDRESSES = [wire.Address(ip, PORT) for ip in NODE_IPS]
STRANGER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)
STRANGER_IP = "127.0.0.66"
SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64



def dumps(obj) -> bytes:
    return orjson.dumps(obj)


def new_cid() -> str:
    return wire.new_circuit_id()


def cell(cid: str, payload: dict) -> bytes:
    return dumps({"CID": cid, "payload": payload})


def pem(key) -> str:
    return crypto.public_key_pem(key)


def identity_body(key, onion_key: bytes | None = None) -> bytes:
    """A node's /identity: /1's, or /2's with its onion key (raw) when given."""
    if onion_key is None:
        return dumps({"role": "node", "public_key": pem(key), "fingerprint": crypto.fingerprint(key),
                      "protocol": "onion-http/1"})
    return dumps({"role": "node", "public_key": pem(key), "fingerprint": crypto.fingerprint(key),
                  "protocol": "onion-http/2", "protocols": ["onion-http/1", "onion-http/2"],
                  "onion_key": base64.b64encode(onion_key).decode("ascii")})


@dataclass
class Post:
    address: wire.Address
    body: bytes
    headers: dict
    deferred: defer.Deferred | None = None

    @property
    def cell(self) -> cells.Cell:
        return cells.parse_cell(self.body)

    @property
    def payload(self) -> dict:
        return self.cell.payload

    @property
    def kind(self) -> str:
        """The control type of a control cell, else the type of the message carried
        ("sealed" for a message inside a circuit's tracker layer, which only its peer reads)."""
        payload = self.payload
        return payload.get("type") if isinstance(payload, dict) else "sealed"

    @property
    def is_control(self) -> bool:
        return self.cell.is_control

    @property
    def signature(self):
        return self.headers.get(SIGNATURE_HEADER)


class TrackerOutbound(FakeOutbound):
    """The tracker's HTTP client: every POST answers ``{}``, unless its kind is in
    ``failures`` (message kind -> exception to fail it with) or ``holding`` is set
    (the POST waits for the test to fire ``Post.deferred``). ``GET /identity``
    answers from ``pages`` (address -> (status, body) or exception).
    """

    unreachable = "next hop is unreachable"

    def __init__(self):
        super().__init__()
        self.posts: list[Post] = []
        self.failures: dict = {}
        self.holding = False

    def answer(self, sent: Sent) -> defer.Deferred:
        post = Post(sent.address, sent.body, dict(sent.headers or {}))
        self.posts.append(post)
        failure = self.failures.get(post.kind)
        if failure is not None:
            return defer.fail(failure)
        if self.holding:
            post.deferred = defer.Deferred()
            return post.deferred
        return defer.succeed(b"{}")

    def kinds(self) -> list:
        return [p.kind for p in self.posts]


class TrackerHarness:
    def __init__(self, *, seed: int = 1, nodes=None, heartbeat: float = 30.0, max_pending: int = 10_000,
                 resolve=None, onion_keys=None, sealed_hop=True,
                 **catalogue_options):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.rng = random.Random(seed)
        self.catalogue = Catalogue(self.clock, rng=self.rng, **catalogue_options)
        self.registry = NodeRegistry(self.clock, TRACKER_KEY, heartbeat=heartbeat)
        for address, key in (nodes if nodes is not None else zip(NODE_ADDRESSES, NODE_KEYS)):
            self.registry.register(address, pem(key), crypto.fingerprint(key))
        self.outbound = TrackerOutbound()
        self.tracker = Tracker(clock=self.clock, signing_key=TRACKER_KEY, own_address=TRACKER_ADDRESS,
                               catalogue=self.catalogue, registry=self.registry, outbound=self.outbound,
                               resolve=resolve, max_pending=max_pending, onion_keys=onion_keys,
                               sealed_hop=sealed_hop)

    def handle(self, exit_ip: str, body: bytes) -> defer.Deferred:
        return defer.ensureDeferred(self.tracker.handle_cell(exit_ip, body))

    async def send(self, exit_ip: str, cid: str, message: dict) -> dict:
        """The tracker's reply object to ``message`` from circuit (exit_ip, cid)."""
        answer = await self.tracker.handle_cell(exit_ip, cell(cid, message))
        return orjson.loads(answer)["payload"]

    async def ls(self, exit_ip: str, cid: str, files: list) -> dict:
        return await self.send(exit_ip, cid, {"type": "ls", "files": files})

    def snapshot(self):
        """What a refused message must leave unchanged."""
        cat = self.catalogue
        return ({k: (c.exit, c.files, c.last_seen) for k, c in cat.circuits.items()},
                {k: dict(v) for k, v in cat.entries.items()},
                {k: set(v) for k, v in cat.names.items()},
                cat.listing())
