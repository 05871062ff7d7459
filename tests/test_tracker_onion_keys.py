"""Onion keys at the tracker (PROTOCOL.md §10, §11): nodes register theirs (checked against
their /identity like the RSA key), the signed directory lists them and the tracker's own,
and the tracker's key is kept on disk (0600) and rotated by its service.
"""

from __future__ import annotations

import base64
import os
import stat

import orjson
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from onion_twisted.net import config, keys
from onion_twisted.protocol import crypto
from onion_twisted.protocol.directory import parse_signed_directory
from onion_twisted.protocol.errors import BadRequest, Forbidden
from onion_twisted.protocol.onion_keys import OnionKeyRing
from onion_twisted.tracker.app import TrackerApp
from onion_twisted.tracker.service import TrackerService

from tests.support.deferreds import inline
from tests.support.sealed_client import SealedClient
from tests.support.tracker_fakes import (NODE_ADDRESSES, NODE_IPS, NODE_KEYS, NOW, OTHER_TRACKER_KEY, PORT, TRACKER_KEY,
                                         TrackerHarness, dumps, identity_body, new_cid, pem)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def new_onion_key() -> bytes:
    return OnionKeyRing(MemoryReactorClock()).current_public


class RegistrationTests(unittest.TestCase):
    def setUp(self):
        self.h = TrackerHarness(nodes=[])
        self.key = NODE_KEYS[0]
        self.address = NODE_ADDRESSES[0]
        self.onion = new_onion_key()

    def register(self, onion_key=None, **fields):
        body = {"address": str(self.address), "public_key": pem(self.key), **fields}
        if onion_key is not None:
            body["onion_key"] = b64(onion_key) if isinstance(onion_key, bytes) else onion_key
        return defer.ensureDeferred(self.h.tracker.register_node(self.address.ip, dumps(body)))

    def directory(self, key=TRACKER_KEY):
        body, signature = self.h.registry.signed()
        return parse_signed_directory(body, signature, key.public_key(), PORT)

    @inline
    async def test_a_node_with_an_onion_key_is_listed_with_it(self):
        self.h.outbound.pages[self.address] = (200, identity_body(self.key, self.onion))
        await self.register(self.onion)
        entry = self.directory().nodes[self.address]
        self.assertEqual(entry.onion_key, self.onion)
        self.assertTrue(entry.speaks_v2)

    @inline
    async def test_a_v1_node_is_listed_without_one(self):
        self.h.outbound.pages[self.address] = (200, identity_body(self.key))
        await self.register()
        body, _ = self.h.registry.signed()
        self.assertNotIn(b'"onion_key"', body)
        self.assertIsNone(self.directory().nodes[self.address].onion_key)

    @inline
    async def test_malformed_onion_keys_are_400(self):
        self.h.outbound.pages[self.address] = (200, identity_body(self.key, self.onion))
        for bad in ("", "not base64!", b64(bytes(31)), b64(bytes(33)), 32, ["x"], b64(self.onion)[:-1] + "x"):
            await self.assertFailure(self.register(bad), BadRequest)
        self.assertEqual(len(self.h.registry), 0)
        self.assertEqual(self.h.outbound.gets, [])

    @inline
    async def test_an_onion_key_the_identity_does_not_show_is_403(self):
        for shown in (identity_body(self.key, new_onion_key()), identity_body(self.key)):
            self.h.outbound.pages[self.address] = (200, shown)
            await self.assertFailure(self.register(self.onion), Forbidden)
        self.assertEqual(len(self.h.registry), 0)

    @inline
    async def test_a_changed_onion_key_is_checked_again(self):
        self.h.outbound.pages[self.address] = (200, identity_body(self.key, self.onion))
        await self.register(self.onion)
        await self.register(self.onion)  # a heartbeat: no new fetch
        self.assertEqual(len(self.h.outbound.gets), 1)
        rotated = new_onion_key()
        # The node claims a new key its /identity does not show: refused, the old one stays listed.
        await self.assertFailure(self.register(rotated), Forbidden)
        self.assertEqual(len(self.h.outbound.gets), 2)
        self.assertEqual(self.directory().nodes[self.address].onion_key, self.onion)
        self.h.outbound.pages[self.address] = (200, identity_body(self.key, rotated))
        await self.register(rotated)
        self.assertEqual(len(self.h.outbound.gets), 3)
        self.assertEqual(self.directory().nodes[self.address].onion_key, rotated)


class SignedDirectoryTests(unittest.TestCase):
    def test_the_tracker_onion_key_under_a_valid_signature(self):
        h = TrackerHarness()
        onion = new_onion_key()
        h.registry.register(NODE_ADDRESSES[0], pem(NODE_KEYS[0]), crypto.fingerprint(NODE_KEYS[0]),
                            onion_key=onion)
        body, signature = h.registry.signed()
        directory = parse_signed_directory(body, signature, TRACKER_KEY.public_key(), PORT)
        self.assertEqual(directory.tracker_onion_key, h.tracker.onion_keys.current_public)
        self.assertEqual(directory.nodes[NODE_ADDRESSES[0]].onion_key, onion)
        self.assertEqual([a for a, e in directory.nodes.items() if e.onion_key is None], NODE_ADDRESSES[1:])
        self.assertEqual(orjson.loads(body)["tracker_onion_key"], b64(h.tracker.onion_keys.current_public))
        self.assertRaises(Forbidden, parse_signed_directory, body, signature, OTHER_TRACKER_KEY.public_key(), PORT)

    def test_signed_again_when_the_key_rotates(self):
        h = TrackerHarness()
        first = h.registry.signed()
        h.clock.advance(7 * 86400)
        self.assertTrue(h.tracker.rotate_onion_key())
        body, signature = h.registry.signed()
        self.assertNotEqual(body, first[0])
        directory = parse_signed_directory(body, signature, TRACKER_KEY.public_key(), PORT)
        self.assertEqual(directory.tracker_onion_key, h.tracker.onion_keys.current_public)
        self.assertNotEqual(directory.tracker_onion_key,
                            parse_signed_directory(*first, TRACKER_KEY.public_key(), PORT).tracker_onion_key)


LIFETIME = 2 * 86400.0


class TrackerServiceOnionKeyTests(unittest.TestCase):
    """The service built on a memory reactor, never started: no socket."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(NOW)
        self.data_dir = os.path.abspath(self.mktemp())

    def make(self) -> TrackerService:
        cfg = config.parse("tracker", overrides={"listen": "127.0.0.1", "data_dir": self.data_dir})
        cfg["onion_key_lifetime"] = LIFETIME
        return TrackerService(cfg, reactor=self.reactor)

    def on_disk(self) -> dict:
        """The saved state as written (loading it would rotate it to the clock)."""
        with open(os.path.join(self.data_dir, keys.ONION_KEYS_FILE), "rb") as f:
            return orjson.loads(f.read())

    @staticmethod
    def public_of(entry) -> bytes:
        from cryptography.hazmat.primitives.asymmetric import x25519
        from onion_twisted.protocol.ntor import raw_public
        return raw_public(x25519.X25519PrivateKey.from_private_bytes(base64.b64decode(entry["private"])))

    def test_kept_0600_reused_after_a_restart_and_published(self):
        first = self.make()
        path = os.path.join(self.data_dir, keys.ONION_KEYS_FILE)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertIs(first.tracker.onion_keys, first.onion_keys)
        self.assertEqual(first.tracker.registry.tracker_onion_key, first.onion_keys.current_public)
        self.assertEqual(self.make().onion_keys.current_public, first.onion_keys.current_public)

    def test_the_timer_rotates_and_saves(self):
        service = self.make()
        old = service.onion_keys.current_public
        for timer in service:
            if hasattr(timer, "call") and timer.call[0] == service._rotate_onion_key:
                timer.startService()
                self.addCleanup(timer.stopService)
        self.reactor.advance(LIFETIME)
        new = service.onion_keys.current_public
        self.assertNotEqual(new, old)
        self.assertEqual(service.tracker.registry.tracker_onion_key, new)
        self.assertEqual(self.public_of(self.on_disk()["current"]), new)
        self.assertEqual(self.public_of(self.on_disk()["previous"]), old)  # in its grace, on disk too
        self.reactor.advance(86400 + 60)
        self.assertIsNone(self.on_disk()["previous"])  # past it: gone from the disk
        self.assertIsNone(service.onion_keys.private_for(old))


class V1TrackerTests(unittest.TestCase):
    """``sealed_hop=False``: a tracker of onion-http/1, as /2 peers and nodes must still meet one."""

    @inline
    async def test_no_key_published_no_sealed_circuit_and_v1_messages_as_before(self):
        h = TrackerHarness(sealed_hop=False)
        body, signature = h.registry.signed()
        self.assertIsNone(parse_signed_directory(body, signature, TRACKER_KEY.public_key(), PORT).tracker_onion_key)
        self.assertNotIn(b"tracker_onion_key", body)
        identity = orjson.loads(TrackerApp(h.tracker).identity)
        self.assertEqual((identity["protocol"], identity["protocols"]), ("onion-http/1", ["onion-http/1"]))
        self.assertNotIn("onion_key", identity)
        self.assertFalse(h.tracker.rotate_onion_key())
        client = SealedClient(h, NODE_IPS[0])
        e = await self.assertFailure(defer.ensureDeferred(client.handshake(onion=new_onion_key())), BadRequest)
        self.assertIn("onion-http/1", e.detail)
        self.assertEqual(len(h.tracker.sealed), 0)
        self.assertEqual((await h.ls(NODE_IPS[0], new_cid(), []))["type"], "files")

    def test_a_v2_tracker_shows_both_protocols_and_its_onion_key(self):
        h = TrackerHarness()
        identity = orjson.loads(TrackerApp(h.tracker).identity)
        self.assertEqual(identity["protocols"], ["onion-http/1", "onion-http/2"])
        self.assertEqual(base64.b64decode(identity["onion_key"]), h.tracker.onion_keys.current_public)
        h.clock.advance(7 * 86400)
        h.tracker.rotate_onion_key()
        rotated = orjson.loads(TrackerApp(h.tracker).identity)  # a new app: the cached body is per app
        self.assertEqual(base64.b64decode(rotated["onion_key"]), h.tracker.onion_keys.current_public)
