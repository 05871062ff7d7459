"""onion-http/2 layers: counters and the replay window, padding classes, the exit frame."""

from __future__ import annotations

import os
import tracemalloc

from twisted.trial import unittest

from onion_twisted.protocol import onion2
from onion_twisted.protocol.errors import BadRequest, Conflict
from onion_twisted.protocol.onion2 import WINDOW, HopKeys, ReplayWindow


def pair() -> tuple[HopKeys, HopKeys]:
    material = os.urandom(56)
    args = (material[:16], material[16:32], material[32:44], material[44:56])
    return HopKeys(*args), HopKeys(*args)


class LayerTests(unittest.SynchronousTestCase):
    def test_a_layer_is_counter_then_ciphertext_and_tag(self):
        client, _ = pair()
        first, second = client.seal_forward(b"abc"), client.seal_forward(b"abc")
        self.assertEqual(len(first), 8 + 3 + 16)
        self.assertEqual(first[:8], bytes(8))
        self.assertEqual(second[:8], (1).to_bytes(8, "big"))
        self.assertNotEqual(first[8:], second[8:])  # another counter, another nonce

    def test_replayed_counter_is_a_conflict_and_changes_nothing(self):
        client, node = pair()
        layer = client.seal_forward(b"once")
        node.open_forward(layer)
        self.assertIn("replayed", self.assertRaises(Conflict, node.open_forward, layer).detail)
        self.assertEqual(node.open_forward(client.seal_forward(b"next")), b"next")

    def test_reordered_within_the_window_is_accepted(self):
        client, node = pair()
        layers = [client.seal_forward(bytes([i])) for i in range(50)]
        for i in reversed(range(50)):
            self.assertEqual(node.open_forward(layers[i]), bytes([i]))

    def test_older_than_the_window_is_refused(self):
        client, node = pair()
        old = client.seal_forward(b"old")
        for _ in range(WINDOW):
            last = client.seal_forward(b"x")
        node.open_forward(last)  # counter 1024: counter 0 is now outside the window
        self.assertIn("too old", self.assertRaises(Conflict, node.open_forward, old).detail)

    def test_the_oldest_counter_inside_the_window_is_accepted(self):
        client, node = pair()
        oldest = client.seal_forward(b"oldest")
        for _ in range(WINDOW - 1):
            last = client.seal_forward(b"x")
        node.open_forward(last)  # counter 1023: counter 0 is the window's last place
        self.assertEqual(node.open_forward(oldest), b"oldest")

    def test_a_forged_layer_does_not_move_the_window(self):
        client, node = pair()
        forged = (10 ** 6).to_bytes(8, "big") + os.urandom(40)
        self.assertRaises(BadRequest, node.open_forward, forged)
        self.assertEqual(node.open_forward(client.seal_forward(b"first")), b"first")

    def test_a_tampered_counter_does_not_decrypt(self):
        client, node = pair()
        layer = bytearray(client.seal_forward(b"m"))
        layer[7] ^= 1
        self.assertRaises(BadRequest, node.open_forward, bytes(layer))

    def test_short_layers_are_bad_requests(self):
        _, node = pair()
        for layer in (b"", bytes(23)):
            self.assertRaises(BadRequest, node.open_forward, layer)

    def test_directions_are_separate(self):
        client, node = pair()
        self.assertRaises(BadRequest, client.open_backward, client.seal_forward(b"reflected"))
        # Both directions count from zero on their own.
        self.assertEqual(client.open_backward(node.seal_backward(b"b0")), b"b0")

    def test_window_jump_far_ahead_forgets_the_past(self):
        window = ReplayWindow()
        window.mark(3)
        window.mark(5000)
        self.assertRaises(Conflict, window.check, 3)
        self.assertRaises(Conflict, window.check, 5000)
        window.check(4999)

    def test_counter_exhaustion_is_a_conflict(self):
        client, _ = pair()
        client._sent_f = onion2.MAX_COUNTER
        self.assertRaises(Conflict, client.seal_forward, b"x")

    def test_idle_and_used_hops_stay_small(self):
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            hops = []
            for _ in range(500):
                client, node = pair()
                node.open_forward(client.seal_forward(b"x"))  # a window in use
                hops.append(node)
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
        self.assertLess(grown / len(hops), 600)


class PaddingTests(unittest.SynchronousTestCase):
    def test_classes(self):
        self.assertEqual(onion2.padded_size(0), 1024)
        self.assertEqual(onion2.padded_size(1020), 1024)
        self.assertEqual(onion2.padded_size(1021), 2048)
        self.assertEqual(onion2.padded_size(65532), 65536)
        self.assertEqual(onion2.padded_size(65533), 131072)
        self.assertEqual(onion2.padded_size(200_000), 262144)

    def test_control_sized_messages_share_one_length(self):
        short, longer = onion2.pad_message(b'{"type":"list"}'), onion2.pad_message(b'{"type":"ls","files":["a"]}')
        self.assertEqual(len(short), len(longer))

    def test_a_last_short_chunk_has_the_size_of_a_full_one(self):
        full = onion2.pad_message(b"x" * 349_600, chunk_size=262144)
        last = onion2.pad_message(b"x" * 1_000, chunk_size=262144)
        self.assertEqual(len(full), len(last))
        self.assertEqual(len(full), onion2.chunk_class(262144))

    def test_round_trip(self):
        for body in (b"", b"{}", os.urandom(5000)):
            self.assertEqual(onion2.unpad(onion2.pad_message(body)), body)

    def test_bad_padding_is_refused(self):
        good = onion2.pad_message(b"{}")
        for data in (b"", b"\0\0\0", (2000).to_bytes(4, "big") + good[4:], good[:-1] + b"\x01"):
            self.assertRaises(BadRequest, onion2.unpad, data)

    def test_a_body_bigger_than_its_class_is_a_programming_error(self):
        self.assertRaises(ValueError, onion2.pad, b"x" * 1021, 1024)


class FrameTests(unittest.SynchronousTestCase):
    def test_round_trip(self):
        for kind in (onion2.FRAME_OBJECT, onion2.FRAME_SEALED):
            self.assertEqual(onion2.parse_frame(onion2.frame(kind, b"body")), (kind, b"body"))

    def test_empty_or_unknown_kind_is_refused(self):
        self.assertRaises(BadRequest, onion2.parse_frame, b"")
        self.assertRaises(BadRequest, onion2.parse_frame, b"\x03body")
        self.assertRaises(BadRequest, onion2.parse_frame, b"{}")
