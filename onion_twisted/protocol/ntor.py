"""The circuit handshake of onion-http/2 (PROTOCOL.md §11): ntor over X25519, with no I/O.

Tor's ntor (tor-spec "The ntor handshake", proposal 216) with this
project's labels. The client sends ``0x02 ‖ ID ‖ B ‖ X`` (97 bytes: a /1
CREATE is an RSA ciphertext of at least 128 bytes, so the two never clash);
the member answers ``Y ‖ AUTH`` (64 bytes). Both derive, from
``X^y ‖ X^b ‖ ID ‖ B ‖ X ‖ Y ‖ PROTOID``, a key seed and an authenticator;
the seed is expanded with HKDF-SHA256 into a key and a nonce base per
direction (``HopKeys``). The member's long-term key ``b`` only
authenticates: the layer keys also depend on the ephemeral ``y``, which is
forgotten once the reply is sent, so a key stolen later opens nothing
recorded (forward secrecy). Ephemeral keys are injectable for test vectors.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from onion_twisted.protocol.errors import BadRequest
from onion_twisted.protocol.onion2 import HopKeys

PROTOID = b"onion-http/2 ntor-x25519-sha256-1"
T_MAC = PROTOID + b":mac"
T_KEY = PROTOID + b":key_extract"
T_VERIFY = PROTOID + b":verify"
M_EXPAND = PROTOID + b":key_expand"

HANDSHAKE_TYPE = 0x02
ID_SIZE = KEY_SIZE = 32
HANDSHAKE_SIZE = 1 + ID_SIZE + KEY_SIZE + KEY_SIZE  # 97
REPLY_SIZE = KEY_SIZE + 32  # Y ‖ AUTH
KEY_MATERIAL = 16 + 16 + 12 + 12  # Kf ‖ Kb ‖ Nf ‖ Nb
_ZERO = bytes(32)


def _h(message: bytes, tweak: bytes) -> bytes:
    return hmac.new(tweak, message, hashlib.sha256).digest()


def raw_public(key) -> bytes:
    """The 32 raw bytes of an X25519 public key (or of a private key's public half)."""
    if isinstance(key, x25519.X25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def member_id(public_key) -> bytes:
    """``ID``: SHA-256 of the DER SubjectPublicKeyInfo of a member's identity key
    (a node's RSA key: its /1 fingerprint, unhexed; the tracker's Ed25519 key)."""
    if hasattr(public_key, "public_key"):
        public_key = public_key.public_key()
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


def _exchange(private: x25519.X25519PrivateKey, public_raw: bytes) -> bytes:
    try:
        shared = private.exchange(x25519.X25519PublicKey.from_public_bytes(public_raw))
    except ValueError:
        # cryptography refuses an all-zero output itself (a small-order point).
        raise BadRequest("handshake key gives an all-zero shared secret") from None
    if hmac.compare_digest(shared, _ZERO):
        raise BadRequest("handshake key gives an all-zero shared secret")
    return shared


def _derive(secret_input: bytes, member: bytes, onion: bytes, x: bytes, y: bytes) -> tuple[HopKeys, bytes]:
    key_seed = _h(secret_input, T_KEY)
    verify = _h(secret_input, T_VERIFY)
    auth = _h(verify + member + onion + y + x + PROTOID + b"Server", T_MAC)
    material = HKDFExpand(hashes.SHA256(), KEY_MATERIAL, M_EXPAND).derive(key_seed)
    return HopKeys(material[0:16], material[16:32], material[32:44], material[44:56]), auth


def is_handshake(data: bytes) -> bool:
    """True for a /2 handshake (97 bytes, type 0x02); a /1 CREATE is an RSA ciphertext."""
    return len(data) == HANDSHAKE_SIZE and data[0] == HANDSHAKE_TYPE


def parse_handshake(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(ID, B, X) of a client handshake; BadRequest if it is not one."""
    if not is_handshake(data):
        raise BadRequest("not an onion-http/2 handshake (0x02 ‖ ID ‖ B ‖ X, 97 bytes)")
    return bytes(data[1:33]), bytes(data[33:65]), bytes(data[65:97])


class ClientHandshake:
    """The client's half of one handshake, kept until the member's reply."""

    __slots__ = ("_private", "member", "onion", "x")

    def __init__(self, member: bytes, onion: bytes, private: x25519.X25519PrivateKey):
        self._private = private
        self.member = member
        self.onion = onion
        self.x = raw_public(private)

    def finish(self, reply: bytes) -> HopKeys:
        """The hop's keys from its ``Y ‖ AUTH``; BadRequest if AUTH does not check."""
        if len(reply) != REPLY_SIZE:
            raise BadRequest("handshake reply is not Y ‖ AUTH (64 bytes)")
        y, auth = bytes(reply[:32]), bytes(reply[32:])
        secret_input = (_exchange(self._private, y) + _exchange(self._private, self.onion)
                        + self.member + self.onion + self.x + y + PROTOID)
        keys, expected = _derive(secret_input, self.member, self.onion, self.x, y)
        if not hmac.compare_digest(auth, expected):
            raise BadRequest("handshake reply does not authenticate (AUTH mismatch)")
        self._private = None  # used once
        return keys


def client_start(member: bytes, onion_public: bytes, *, private=None) -> tuple[ClientHandshake, bytes]:
    """Begin a handshake with the member whose ID and onion key are given: (state, 97 bytes to send)."""
    if len(member) != ID_SIZE or len(onion_public) != KEY_SIZE:
        raise ValueError("ID and onion key are 32 bytes each")
    private = private or x25519.X25519PrivateKey.generate()
    state = ClientHandshake(bytes(member), bytes(onion_public), private)
    return state, bytes([HANDSHAKE_TYPE]) + state.member + state.onion + state.x


def server_reply(own_id: bytes, private_for, data: bytes, *, ephemeral=None) -> tuple[HopKeys, bytes]:
    """Answer a client handshake: (the hop's keys, ``Y ‖ AUTH``).

    ``private_for(B)`` gives the onion private key whose public half is B
    (the current one, or the previous one in its grace period), else None.
    BadRequest for another member's ID, an unknown B or an all-zero secret.
    """
    member, onion, x = parse_handshake(data)
    if not hmac.compare_digest(member, own_id):
        raise BadRequest("handshake is for another member")
    onion_private = private_for(onion)
    if onion_private is None:
        raise BadRequest("unknown onion key (rotated out, or never this member's)")
    ephemeral = ephemeral or x25519.X25519PrivateKey.generate()
    y = raw_public(ephemeral)
    secret_input = _exchange(ephemeral, x) + _exchange(onion_private, x) + member + onion + x + y + PROTOID
    keys, auth = _derive(secret_input, member, onion, x, y)
    return keys, y + auth
