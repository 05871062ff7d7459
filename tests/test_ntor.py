"""The ntor handshake of onion-http/2 (PROTOCOL.md §11): both halves, each refusal, forward secrecy."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric import x25519
from twisted.trial import unittest

from onion_twisted.protocol import crypto, ntor, onion2
from onion_twisted.protocol.errors import BadRequest

MEMBER = hashlib.sha256(b"a member").digest()


def member_keys():
    onion = x25519.X25519PrivateKey.generate()
    public = ntor.raw_public(onion)
    return onion, public, (lambda key: onion if key == public else None)


class HandshakeTests(unittest.SynchronousTestCase):
    def test_both_sides_derive_the_same_keys_in_each_direction(self):
        _, public, private_for = member_keys()
        state, handshake = ntor.client_start(MEMBER, public)
        server, reply = ntor.server_reply(MEMBER, private_for, handshake)
        client = state.finish(reply)
        self.assertEqual(server.open_forward(client.seal_forward(b"to the member")), b"to the member")
        self.assertEqual(client.open_backward(server.seal_backward(b"to the peer")), b"to the peer")

    def test_forward_and_backward_keys_differ(self):
        _, public, private_for = member_keys()
        state, handshake = ntor.client_start(MEMBER, public)
        server, _ = ntor.server_reply(MEMBER, private_for, handshake)
        self.assertNotEqual(server._kf, server._kb)
        self.assertNotEqual(server._nf, server._nb)
        # A forward layer reflected back to its sender does not open.
        layer = server.seal_backward(b"x")
        self.assertRaises(BadRequest, server.open_forward, layer)

    def test_handshake_and_reply_sizes(self):
        _, public, private_for = member_keys()
        _, handshake = ntor.client_start(MEMBER, public)
        self.assertEqual(len(handshake), 97)
        self.assertEqual(handshake[0], 2)
        self.assertTrue(ntor.is_handshake(handshake))
        self.assertEqual(len(ntor.server_reply(MEMBER, private_for, handshake)[1]), 64)

    def test_a_v1_create_is_never_taken_for_a_handshake(self):
        key = crypto.generate_node_key(1024)
        sealed = crypto.seal_session_key(key.public_key(), crypto.new_session_key())
        self.assertFalse(ntor.is_handshake(sealed))

    def test_handshake_for_another_member_is_refused(self):
        _, public, private_for = member_keys()
        _, handshake = ntor.client_start(hashlib.sha256(b"another").digest(), public)
        error = self.assertRaises(BadRequest, ntor.server_reply, MEMBER, private_for, handshake)
        self.assertIn("another member", error.detail)

    def test_unknown_onion_key_is_refused(self):
        _, _, private_for = member_keys()
        _, handshake = ntor.client_start(MEMBER, ntor.raw_public(x25519.X25519PrivateKey.generate()))
        self.assertIn("unknown onion key", self.assertRaises(BadRequest, ntor.server_reply, MEMBER,
                                                             private_for, handshake).detail)

    def test_all_zero_client_key_is_refused(self):
        _, public, private_for = member_keys()
        handshake = bytes([2]) + MEMBER + public + bytes(32)  # X = 0: every exchange gives zero
        self.assertIn("all-zero", self.assertRaises(BadRequest, ntor.server_reply, MEMBER, private_for,
                                                    handshake).detail)

    def test_all_zero_member_key_is_refused_by_the_client(self):
        _, public, _ = member_keys()
        state, _ = ntor.client_start(MEMBER, public)
        self.assertRaises(BadRequest, state.finish, bytes(32) + bytes(32))

    def test_wrong_auth_is_refused(self):
        _, public, private_for = member_keys()
        state, handshake = ntor.client_start(MEMBER, public)
        _, reply = ntor.server_reply(MEMBER, private_for, handshake)
        forged = reply[:32] + bytes(b ^ 1 for b in reply[32:])
        self.assertIn("AUTH", self.assertRaises(BadRequest, state.finish, forged).detail)

    def test_reply_from_an_impostor_without_the_onion_key_is_refused(self):
        _, public, _ = member_keys()
        impostor, impostor_public, impostor_for = member_keys()
        state, handshake = ntor.client_start(MEMBER, public)
        # The impostor answers as if its own key were the one asked for.
        _, reply = ntor.server_reply(MEMBER, lambda key: impostor, handshake)
        self.assertRaises(BadRequest, state.finish, reply)

    def test_short_or_long_replies_are_refused(self):
        _, public, _ = member_keys()
        state, _ = ntor.client_start(MEMBER, public)
        for reply in (b"", bytes(63), bytes(65)):
            self.assertRaises(BadRequest, state.finish, reply)

    def test_malformed_handshakes_are_refused(self):
        _, public, private_for = member_keys()
        _, handshake = ntor.client_start(MEMBER, public)
        for data in (b"", handshake[:-1], handshake + b"\0", b"\x01" + handshake[1:]):
            self.assertRaises(BadRequest, ntor.server_reply, MEMBER, private_for, data)


class ForwardSecrecyTests(unittest.SynchronousTestCase):
    """An attacker who records a circuit's handshake and layers, then steals every
    long-term key of the member, still cannot peel a recorded layer."""

    def test_stolen_long_term_keys_do_not_open_recorded_layers(self):
        onion, public, private_for = member_keys()
        identity = crypto.generate_node_key(1024)
        member = ntor.member_id(identity.public_key())
        state, handshake = ntor.client_start(member, public)
        server, reply = ntor.server_reply(member, private_for, handshake)
        client = state.finish(reply)
        recorded = [client.seal_forward(onion2.pad_message(b'{"type":"ls","files":["secret.txt"]}'))]
        del server  # the member forgets y with the circuit

        attacker = StolenKeysAttacker(identity, onion)
        self.assertFalse(attacker.can_open(handshake, reply, recorded[0]))

    def test_the_attacker_object_can_open_what_its_keys_do_open(self):
        # The attacker is not vacuous: given the member's ephemeral key as well,
        # the same procedure opens the layer.
        onion, public, private_for = member_keys()
        ephemeral = x25519.X25519PrivateKey.generate()
        state, handshake = ntor.client_start(MEMBER, public)
        _, reply = ntor.server_reply(MEMBER, private_for, handshake, ephemeral=ephemeral)
        layer = state.finish(reply).seal_forward(b"secret")
        self.assertTrue(StolenKeysAttacker(None, onion, member=MEMBER, ephemeral=ephemeral)
                        .can_open(handshake, reply, layer))


class StolenKeysAttacker:
    """Holds a member's long-term keys (RSA identity, onion key), maybe an ephemeral one.

    Without the ephemeral ``y`` it can compute X^b but not X^y; it tries the
    guesses a key thief has (b in place of y) and a replayed handshake.
    """

    def __init__(self, identity, onion, *, member=None, ephemeral=None):
        self.member = member or ntor.member_id(identity.public_key())
        self.onion = onion
        self.ephemeral = ephemeral

    def can_open(self, handshake: bytes, reply: bytes, layer: bytes) -> bool:
        guesses = [self.ephemeral] if self.ephemeral is not None else [self.onion]
        for guess in guesses:
            try:
                keys, _ = ntor.server_reply(self.member, lambda key: self.onion, handshake, ephemeral=guess)
                keys.open_forward(layer)
                return True
            except BadRequest:
                pass
        # Replaying the recorded handshake gives fresh keys, not the recorded ones.
        keys, _ = ntor.server_reply(self.member, lambda key: self.onion, handshake)
        try:
            keys.open_forward(layer)
            return True
        except BadRequest:
            return False
