"""Onion key rotation with a grace period (PROTOCOL.md §11), on an injected clock."""

from __future__ import annotations

import os
import stat
import tempfile

from twisted.internet.task import Clock
from twisted.trial import unittest

from onion_twisted.net import keys
from onion_twisted.protocol.onion_keys import ONION_KEY_GRACE, OnionKeyRing, parse_onion_key

DAY = 24 * 3600.0


class RingTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.ring = OnionKeyRing(self.clock, lifetime=7 * DAY)

    def test_current_key_answers_for_itself_only(self):
        public = self.ring.current_public
        self.assertIsNotNone(self.ring.private_for(public))
        self.assertIsNone(self.ring.private_for(bytes(32)))

    def test_no_rotation_before_the_lifetime(self):
        self.clock.advance(7 * DAY - 1)
        self.assertFalse(self.ring.rotate_if_due())

    def test_rotation_keeps_the_previous_key_for_its_grace_then_forgets_it(self):
        old = self.ring.current_public
        self.clock.advance(7 * DAY)
        self.assertTrue(self.ring.rotate_if_due())
        self.assertNotEqual(self.ring.current_public, old)
        self.clock.advance(ONION_KEY_GRACE)
        self.assertIsNotNone(self.ring.private_for(old))
        self.clock.advance(1)
        self.assertIsNone(self.ring.private_for(old))
        self.ring.rotate_if_due()
        self.assertNotIn(old.hex(), repr(self.ring.to_json()))

    def test_saved_state_round_trips(self):
        old = self.ring.current_public
        self.clock.advance(7 * DAY)
        self.ring.rotate_if_due()
        again = OnionKeyRing.from_json(self.clock, self.ring.to_json(), 7 * DAY)
        self.assertEqual(again.current_public, self.ring.current_public)
        self.assertIsNotNone(again.private_for(old))

    def test_a_ring_loaded_after_its_lifetime_rotates_at_once(self):
        data = self.ring.to_json()
        self.clock.advance(8 * DAY)
        again = OnionKeyRing.from_json(self.clock, data, 7 * DAY)
        self.assertNotEqual(again.current_public, self.ring.current_public)

    def test_unreadable_state_is_a_value_error(self):
        for data in (b"", b"{}", b'{"current": {"private": "!!", "created": 0}}'):
            self.assertRaises(ValueError, OnionKeyRing.from_json, self.clock, data)

    def test_lifetime_must_be_positive(self):
        self.assertRaises(ValueError, OnionKeyRing, self.clock, 0)


class OnDiskTests(unittest.SynchronousTestCase):
    def test_keys_on_disk_are_0600_and_reused(self):
        clock = Clock()
        directory = tempfile.mkdtemp()
        first = keys.load_or_create_onion_keys(directory, clock, 7 * DAY)
        path = os.path.join(directory, keys.ONION_KEYS_FILE)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(keys.load_or_create_onion_keys(directory, clock, 7 * DAY).current_public,
                         first.current_public)

    def test_a_corrupt_file_is_replaced(self):
        clock = Clock()
        directory = tempfile.mkdtemp()
        with open(os.path.join(directory, keys.ONION_KEYS_FILE), "wb") as f:
            f.write(b"not json")
        ring = keys.load_or_create_onion_keys(directory, clock, 7 * DAY)
        self.assertEqual(len(ring.current_public), 32)


class PublishedKeyTests(unittest.SynchronousTestCase):
    def test_parse_onion_key(self):
        self.assertEqual(parse_onion_key("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="), bytes(range(32)))
        for bad in (None, 5, "", "AAEC", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh9=",
                    "!AECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="):
            self.assertRaises(ValueError, parse_onion_key, bad)
